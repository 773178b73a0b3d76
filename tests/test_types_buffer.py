import math
import threading

import pytest
import torch

from rlhf.buffer import BufferClosed, ReplayBuffer
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


def group(index, version=0, reward=1.0):
    s = sample([1], [2], reward, index)
    s.policy_version = version
    return SampleGroup(s.prompt, [s])


def test_buffer_takes_oldest_version_first_and_drops_stale_groups_counted():
    buf = ReplayBuffer(capacity_groups=4)
    for _ in range(4):
        assert buf.reserve(timeout=0)
    for index, version in ((1, 2), (2, 1), (3, 0), (4, 2)):
        buf.put(group(index, version))
    taken, dropped = buf.take(2, min_version=1)
    assert [g.prompt.index for g in taken] == [2, 1]  # version 1, then version 2 in arrival order
    assert [g.prompt.index for g in dropped] == [3]  # version 0 < min_version
    assert buf.reserved == 1 and len(buf) == 1 and buf.total_dropped == 1 and buf.total_taken == 2


def test_full_buffer_blocks_the_producer_instead_of_dropping():
    buf = ReplayBuffer(capacity_groups=2)
    assert buf.reserve(timeout=0) and buf.reserve(timeout=0)
    buf.put(group(1))
    buf.put(group(2))
    got = []
    producer = threading.Thread(target=lambda: got.append(buf.reserve(timeout=10)))
    producer.start()
    producer.join(timeout=0.3)
    assert producer.is_alive() and got == []  # blocked: no slot
    assert not buf.reserve(timeout=0.05)  # and a bounded wait says so
    buf.wait_ready(1)
    taken, dropped = buf.take(1)
    producer.join(timeout=5)
    assert got == [True] and [g.prompt.index for g in taken] == [1] and dropped == []
    assert len(buf) == 1 and buf.reserved == 2 and buf.total_dropped == 0 and buf.blocked_s > 0.2


def test_buffer_refuses_unreserved_and_unscored_groups_and_wakes_a_waiting_taker_on_close():
    buf = ReplayBuffer(capacity_groups=2)
    with pytest.raises(RuntimeError, match="without a reserved slot"):
        buf.put(group(1))
    buf.reserve()
    with pytest.raises(ValueError, match="unscored sample"):
        buf.put(group(1, reward=math.nan))
    with pytest.raises(TimeoutError, match="0 ready, 1 in flight"):
        buf.wait_ready(1, timeout=0.05)
    with pytest.raises(LookupError, match="asked for 1 groups of version >= 0, 0 are ready"):
        buf.take(1)
    with pytest.raises(ValueError, match="more than the capacity"):
        buf.wait_ready(3)
    errors = []

    def taker():
        try:
            buf.wait_ready(1)
        except BufferClosed as e:
            errors.append(e)

    t = threading.Thread(target=taker)
    t.start()
    buf.close(RuntimeError("generator exploded"))
    t.join(timeout=5)
    assert not t.is_alive() and "generator exploded" in str(errors[0])


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


def test_collate_trains_only_the_model_tokens_of_a_multi_turn_sample():
    from rlhf.types import Prompt, Sample, collate

    prompt = Prompt(index=0, text="p", ids=[1, 2], row={})
    s = Sample(prompt=prompt, completion_ids=[10, 11, 90, 91, 12], rollout_logprobs=[-0.5, -0.25, 0.0, 0.0, -1.0],
               text="", truncated=False, policy_version=0, generator=0, completion_mask=[1, 1, 0, 0, 1])
    b = collate([s], pad_id=0)
    # column t scores token t + 1: the first completion token (index 2) is scored at column 1
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 0, 1]]
    assert b.rollout_logprobs.tolist() == [[0.0, -0.5, -0.25, 0.0, 0.0, -1.0]]
