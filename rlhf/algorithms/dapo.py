"""DAPO's data-side pieces (Yu et al. 2025), as pure functions of rewards and lengths.

Its loss-side pieces live elsewhere: clip-higher is ppo_clip's clip_low/clip_high, and the token-level
loss is the "token-mean" aggregation.
"""

from __future__ import annotations

import torch

from rlhf.algorithms.advantages import grouped_rewards


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), to add to the reward: [B] lengths -> [B] float penalties.

    0 for L <= max_len - buffer; (max_len - buffer - L) / buffer for max_len - buffer < L <= max_len, a
    ramp from 0 to -1; -1 for L > max_len. L counts the response's tokens; max_len is L_max, buffer L_cache.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    over = lengths.float() - (max_len - buffer)  # how far into the buffer; <= 0 before it
    return -(over / buffer).clamp(min=0.0, max=1.0)


def groups_with_signal(rewards: torch.Tensor, group_size: int, eps: float = 0.0) -> torch.Tensor:
    """DAPO's dynamic sampling filter: [B] rewards -> [B/G] bool, True for groups worth training on.

    A group is kept when max - min of its rewards exceeds eps. A group whose rewards are all equal
    (all right or all wrong) gets advantage 0 from every group-baseline estimator, so it only dilutes
    the batch; DAPO drops it and samples more prompts until the batch is full (that loop is the caller's).
    """
    r = grouped_rewards(rewards, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > eps
