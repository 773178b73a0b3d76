import pytest

from rlhf.config import AlgorithmConfig
from rlhf.shaping import mask_truncated, shape_rewards
from rlhf.types import Prompt, Sample, collate


def samples(lengths, truncated):
    p = Prompt(index=0, text="p", ids=[1], row={})
    return [Sample(p, [5] * n, [-0.1] * n, "x", t, 0, 0, reward=1.0) for n, t in zip(lengths, truncated)]


def test_overlong_penalty_ramps_over_the_buffer():
    # max_new_tokens 32, buffer 8: lengths <= 24 free; 28 -> -(28-24)/8 = -0.5; 32 -> -1
    ss = samples([10, 24, 28, 32], [False, False, False, True])
    m = shape_rewards(ss, AlgorithmConfig(overlong_buffer=8), max_new_tokens=32)
    assert [s.reward for s in ss] == [1.0, 1.0, 0.5, 0.0]
    assert ss[2].reward_components["overlong"] == -0.5
    assert m["reward/overlong/mean"] == pytest.approx((0 + 0 - 0.5 - 1) / 4)


def test_truncated_penalize_and_mask():
    ss = samples([3, 4], [False, True])
    shape_rewards(ss, AlgorithmConfig(truncated="penalize", truncated_penalty=-0.25), max_new_tokens=4)
    assert [s.reward for s in ss] == [1.0, 0.75]
    batch = mask_truncated(collate(ss, pad_id=0), ss)
    assert batch.loss_mask.sum(1).tolist() == [3.0, 0.0]


def test_keep_changes_nothing():
    ss = samples([3, 4], [False, True])
    assert shape_rewards(ss, AlgorithmConfig(), max_new_tokens=4) == {}
    assert [s.reward for s in ss] == [1.0, 1.0]
