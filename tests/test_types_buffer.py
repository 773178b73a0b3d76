import math

import pytest
import torch

from rlhf.buffer import ReplayBuffer
from rlhf.types import Prompt, Sample, SampleGroup, collate


def sample(prompt_ids, completion_ids, reward=math.nan, index=0):
    p = Prompt(index=index, text="p", ids=prompt_ids, row={})
    lps = [-0.1 * (i + 1) for i in range(len(completion_ids))]
    return Sample(p, completion_ids, lps, "c", truncated=False, policy_version=0, generator=0, reward=reward)


def test_collate_aligns_masks_and_logprobs_with_next_tokens():
    batch = collate([sample([5, 6], [7, 8, 9]), sample([5], [7])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # column t scores input_ids[t + 1]: completion tokens sit at 2..4 (row 0) and 1 (row 1)
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    torch.testing.assert_close(batch.rollout_logprobs, torch.tensor([[0, -0.1, -0.2, -0.3], [-0.1, 0, 0, 0]]))


def test_select_trims_padding_and_chunks_cover_the_batch():
    batch = collate([sample([5, 6], [7, 8, 9]), sample([5], [7]), sample([1], [2])], pad_id=0)
    small = batch.select(slice(1, 3))
    assert small.input_ids.shape == (2, 2) and small.loss_mask.shape == (2, 1)
    parts = batch.chunks(2)
    assert [p.size for p in parts] == [2, 1]  # round(1.5) = 2
    assert sum(p.size for p in parts) == batch.size


def test_buffer_is_fifo_and_refuses_overflow_and_unscored():
    buf = ReplayBuffer(capacity_groups=2)
    g1, g2 = (SampleGroup(sample([1], [2], 1.0, i).prompt, [sample([1], [2], 1.0, i)]) for i in (1, 2))
    buf.put([g1, g2])
    with pytest.raises(OverflowError, match="replay buffer full"):
        buf.put([g1])
    assert [g.prompt.index for g in buf.take(2)] == [1, 2]
    with pytest.raises(LookupError, match="asked for 1 groups, the buffer holds 0"):
        buf.take(1)
    unscored = SampleGroup(sample([1], [2]).prompt, [sample([1], [2])])
    with pytest.raises(ValueError, match="unscored sample"):
        buf.put([unscored])
    assert buf.total_put == 2 and buf.total_taken == 2


def test_minibatch_shards_cover_every_sample_once_per_epoch_with_global_denominators():
    from actors.deepspeed_rank import shard_minibatches
    from rlhf.config import load_config

    cfg = load_config("configs/grpo_tiny.yaml", ["train.ranks=2", "train.micro_batch_size=4",
                                                 "train.mini_batch_size=16", "algorithm.ppo_epochs=2"])
    ss = [sample([1, 2], [3] * (1 + i % 5), reward=1.0, index=i) for i in range(32)]
    batch = collate(ss, pad_id=0)
    per_rank = shard_minibatches(batch, cfg, step=1, world=2, loss_agg="token-mean")
    assert [len(shards) for shards in per_rank] == [4, 4]  # 2 epochs x 32/16 mini-batches, one shard each
    for epoch in range(2):
        seen = []
        for k in range(2 * epoch, 2 * epoch + 2):
            a, b = per_rank[0][k], per_rank[1][k]
            assert a.size == b.size == 8 and a.loss_denominator == b.loss_denominator
            assert a.loss_denominator == a.loss_mask.sum().item() + b.loss_mask.sum().item()  # whole mini-batch
            seen += [row for shard in (a, b) for row in shard.loss_mask.sum(1).tolist()]
        assert sorted(seen) == sorted(batch.loss_mask.sum(1).tolist())  # every sample once per epoch
