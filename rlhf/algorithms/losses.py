"""Policy losses and loss aggregation, on per-token tensors [B, T]."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.algorithms.registry import Registry


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: torch.Tensor  # [B, T] per-token loss (unmasked; aggregate with the mask)
    ratio: torch.Tensor  # [B, T] pi / pi_old
    clipped: torch.Tensor  # [B, T] bool: the clipped branch was the active one


POLICY_LOSSES: Registry = Registry("policy loss")


# Every policy loss shares one signature: (logp, old_logp, advantages, clip_low, clip_high, *, dual_clip).
# The trainer passes the first five positionally; dual_clip is a keyword so that call keeps working.
@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             clip_low: float, clip_high: float, *, dual_clip: float | None = None) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017), with separate low/high clip (DAPO's clip-higher).

    loss_t = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_t),
    ratio_t = exp(logp_t - old_logp_t). With clip_low == clip_high it is the paper's loss.

    dual_clip = c > 1 adds dual-clip PPO (Ye et al. 2020): where A_t < 0 the loss is also capped,
    loss_t = min(loss_t, -c * A_t), so a token whose ratio grew far past 1 while its advantage is
    negative (ratio > c) cannot make the loss, and its gradient, unbounded. Tokens with A_t >= 0 are
    untouched. `clipped` is True where a clip bound (either one) is the active branch, i.e. where the
    token contributes no gradient.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020 use 3), got {dual_clip}")
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        bound = -dual_clip * advantages
        capped = (advantages < 0) & (bound < loss)
        loss = torch.where(capped, bound, loss)
        was_clipped = was_clipped | capped
    return PolicyLossOutput(loss=loss, ratio=ratio, clipped=was_clipped)


@POLICY_LOSSES.register("ppo_dual_clip")
def ppo_dual_clip(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  clip_low: float, clip_high: float, *, dual_clip: float | None = 3.0) -> PolicyLossOutput:
    """ppo_clip with dual-clip on by default at the paper's c = 3, so it can be chosen by name alone."""
    return ppo_clip(logp, old_logp, advantages, clip_low, clip_high, dual_clip=dual_clip)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token importance weights min(pi_old / pi_rollout, cap), without gradient.

    The samples were drawn by the rollout policy (the generator's weights, possibly some versions
    behind); the PPO ratio is taken against pi_old, the trainer's policy before this batch's
    updates. Weighting each token's loss by pi_old / pi_rollout makes the gradient that of samples
    drawn from pi_old; truncating at `cap` bounds its variance (truncated IS, as in Espeholt et al.
    2018 and Yao et al. 2025). cap == 0 turns the correction off (all weights 1).
    """
    if cap == 0:
        return torch.ones_like(old_logp)
    if cap < 1:
        raise ValueError(f"the truncated-IS cap must be 0 (off) or >= 1, got {cap}")
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


# Aggregation: loss = numerator(values, mask) / denominator(mask of the whole mini-batch).
# The numerator is a sum over samples, so a mini-batch split into micro-batches and data-parallel
# shards gives the same loss as the whole batch when every shard divides by the *global*
# denominator and the shards' losses are summed (see tests/test_algorithms.py).
@dataclass(frozen=True)
class LossAggregation:
    numerator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (values [B, T], mask [B, T]) -> scalar
    denominator: Callable[[torch.Tensor, int], float]  # (mask [B, T], max_new_tokens) -> float, whole mini-batch


LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")


def _register_agg(name: str, numerator, denominator) -> None:
    LOSS_AGGREGATIONS.register(name)(LossAggregation(numerator, denominator))


# token-mean: every trained token weighs the same (DAPO; TRL's "dapo").
_register_agg("token-mean", lambda v, m: (v * m).sum(), lambda m, max_len: float(m.sum()))
# seq-mean-token-sum: sum over a sample's tokens, mean over samples.
_register_agg("seq-mean-token-sum", lambda v, m: (v * m).sum(), lambda m, max_len: float(m.shape[0]))
# seq-mean-token-mean: mean over a sample's tokens, mean over samples (the GRPO paper).
_register_agg("seq-mean-token-mean", lambda v, m: ((v * m).sum(-1) / m.sum(-1).clamp(min=1)).sum(),
              lambda m, max_len: float(m.shape[0]))
# seq-mean-token-sum-norm: token sum divided by a constant (Dr.GRPO): samples x generation budget.
_register_agg("seq-mean-token-sum-norm", lambda v, m: (v * m).sum(), lambda m, max_len: float(m.shape[0] * max_len))


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, denominator: float) -> torch.Tensor:
    """Sum this shard's share of the loss, divided by the whole mini-batch's denominator."""
    return LOSS_AGGREGATIONS[mode].numerator(values, mask) / max(denominator, 1e-8)


def loss_denominator(mask: torch.Tensor, mode: str, max_new_tokens: int) -> float:
    """The denominator of `mode` for the whole mini-batch `mask` [B, T]."""
    return LOSS_AGGREGATIONS[mode].denominator(mask, max_new_tokens)
