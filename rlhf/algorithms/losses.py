"""Policy losses and loss aggregation, on per-token tensors [B, T].

Every policy loss shares one signature, `(logp, old_logp, advantages, mask, params) -> PolicyLossOutput`:
logp [B, T] the trainer's log-probs of the sampled tokens (with gradient), old_logp [B, T] the same
before this batch's updates (pi_old), advantages [B, T], mask [B, T] 1 on trained tokens, and the
hyperparameters in `PolicyLossParams`. The loss is per token and unaggregated: the objective
(rlhf/algorithms/objective.py) weights it by the off-policy correction and aggregates it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.algorithms.registry import Registry


@dataclass(frozen=True)
class PolicyLossParams:
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    dual_clip: float = 3.0  # ppo_dual_clip's c > 1 (Ye et al. 2020 use 3); the other losses ignore it


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: torch.Tensor  # [B, T] per-token loss (unmasked; aggregate with the mask)
    ratio: torch.Tensor  # [B, T] pi / pi_old (GSPO: the sequence's ratio on each of its tokens)
    clipped: torch.Tensor  # [B, T] bool: a clip bound was the active branch


# Traits: level "token" (a ratio per token) or "sequence" (one ratio per sample; a correction must
# then be sequence-level too, see rlhf/algorithms/corrections.py); loss_agg, the aggregation the
# paper's objective needs, or None for any; reads, the PolicyLossParams fields it uses.
POLICY_LOSSES: Registry = Registry("policy loss")


def _check_clip(params: PolicyLossParams) -> None:
    if not 0 <= params.clip_low < 1 or params.clip_high < 0:
        raise ValueError(f"clip bounds must be 0 <= clip_low < 1 and clip_high >= 0, got {params}")


@POLICY_LOSSES.register("ppo_clip", level="token", loss_agg=None, reads=frozenset({"clip_low", "clip_high"}))
def ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             params: PolicyLossParams) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017), with separate low/high clip (DAPO's clip-higher).

    loss_t = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_t),
    ratio_t = exp(logp_t - old_logp_t). With clip_low == clip_high it is the paper's loss. `clipped`
    is True where a clip bound is the active branch, i.e. where the token contributes no gradient.
    """
    _check_clip(params)
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high) * advantages
    return PolicyLossOutput(loss=torch.maximum(unclipped, clipped), ratio=ratio, clipped=clipped > unclipped)


@POLICY_LOSSES.register("ppo_dual_clip", level="token", loss_agg=None,
                        reads=frozenset({"clip_low", "clip_high", "dual_clip"}))
def ppo_dual_clip(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  params: PolicyLossParams) -> PolicyLossOutput:
    """Dual-clip PPO (Ye et al. 2020): ppo_clip, and where A_t < 0 the loss is also capped at -c * A_t.

    loss_t = min(ppo_clip_t, -c * A_t) for A_t < 0 (c = params.dual_clip > 1), so a token whose ratio
    grew far past 1 while its advantage is negative (ratio > c) cannot make the loss, and its
    gradient, unbounded. Tokens with A_t >= 0 are untouched.
    """
    if params.dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020 use 3), got {params.dual_clip}")
    out = ppo_clip(logp, old_logp, advantages, mask, params)
    bound = -params.dual_clip * advantages
    capped = (advantages < 0) & (bound < out.loss)
    return PolicyLossOutput(loss=torch.where(capped, bound, out.loss), ratio=out.ratio,
                            clipped=out.clipped | capped)


@POLICY_LOSSES.register("gspo", level="sequence", loss_agg="seq-mean-token-mean",
                        reads=frozenset({"clip_low", "clip_high"}))
def gspo(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
         params: PolicyLossParams) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): PPO's clip on a sequence-level ratio.

    s_i = exp(1/|y_i| * sum_t (logp_t - old_logp_t)), the length-normalised (geometric-mean) ratio
    of sample i over its mask tokens; loss_i = -min(s_i * A_i, clip(s_i, 1 - clip_low, 1 + clip_high) * A_i).
    Written per token as the paper's GSPO-token form, s_i,t = sg[s_i] * pi_t / sg[pi_t]: every token
    of sample i carries the value loss_i and the gradient -A_i * s_i * d logp_t (0 where clipped), so
    aggregated with seq-mean-token-mean (the paper's 1/G sum_i 1/|y_i| sum_t) it is exactly GSPO's
    objective and gradient. The paper's clip ranges are far narrower than PPO's (3e-4 / 4e-4) because
    s_i is a geometric mean; set algorithm.clip_low/clip_high accordingly.
    """
    _check_clip(params)
    mask = mask.float()
    log_s = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    s = torch.exp(log_s.detach()[:, None] + logp - logp.detach())  # [B, T]: value s_i, gradient s_i d logp_t
    seq_adv = advantages  # the GRPO family broadcasts A_i over the sample's tokens
    unclipped = -s * seq_adv
    clipped = -torch.clamp(s, 1.0 - params.clip_low, 1.0 + params.clip_high) * seq_adv
    return PolicyLossOutput(loss=torch.maximum(unclipped, clipped), ratio=s.detach(), clipped=clipped > unclipped)


@POLICY_LOSSES.register("cispo", level="token", loss_agg=None, reads=frozenset({"clip_low", "clip_high"}))
def cispo(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
          params: PolicyLossParams) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, 2025): REINFORCE with a clipped, stop-gradient importance weight.

    loss_t = -sg[clip(ratio_t, 1 - clip_low, 1 + clip_high)] * A_t * logp_t. PPO's clip drops the
    gradient of a token whose ratio left the band; here the weight is clipped instead, so every token
    keeps a gradient (-w_t * A_t * d logp_t). The paper bounds only the top (it sets clip_low large);
    with clip_low < 1 the bottom is bounded too. The loss's value is not PPO's surrogate: at ratio 1 it
    is -A_t * logp_t, so compare `loss/policy` only between CISPO runs. `clipped` marks tokens whose
    weight was clipped (they still train).
    """
    _check_clip(params)
    ratio = torch.exp(logp - old_logp)
    weight = torch.clamp(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high).detach()
    return PolicyLossOutput(loss=-weight * advantages * logp, ratio=ratio.detach(), clipped=weight != ratio.detach())


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
