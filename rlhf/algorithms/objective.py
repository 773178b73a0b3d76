"""The policy objective: one pure function from log-probs to the loss the trainer steps on.

    rho_t  = pi_old / pi_rollout                    (the off-policy correction's input)
    w_t    = correction(rho)                        (CORRECTIONS: token_tis, token_mask, seq_tis, ...)
    loss   = agg(policy_loss_t * w_t)               (POLICY_LOSSES: ppo_clip, gspo, cispo, ...)
           + kl_coef * agg(KL_t(pi || pi_ref))       (when the KL is in the loss, not the reward)
           - entropy_coef * agg(H_t)                 (an exploration bonus)

`agg` is the loss aggregation (LOSS_AGGREGATIONS) over the mask, divided by the whole mini-batch's
denominator so that shards' losses sum to the mini-batch's. The trainer runs the forward, calls
`policy_objective`, and steps; the statistics it returns (sums, so micro-batches and ranks add up)
are everything the run logs about the update, the correction and the rollout-vs-trainer mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from rlhf.algorithms.corrections import CORRECTIONS, CorrectionParams, token_ratio
from rlhf.algorithms.kl import KL_ESTIMATORS
from rlhf.algorithms.losses import POLICY_LOSSES, PolicyLossParams, aggregate


@dataclass(frozen=True)
class ObjectiveSettings:
    policy_loss: str = "ppo_clip"  # name in POLICY_LOSSES
    correction: str = "token_tis"  # name in CORRECTIONS
    loss_agg: str = "token-mean"  # name in LOSS_AGGREGATIONS
    loss_params: PolicyLossParams = field(default_factory=PolicyLossParams)
    correction_params: CorrectionParams = field(default_factory=CorrectionParams)
    kl_coef: float = 0.0  # weight of the KL to the reference in the loss (0 when the KL is in the reward)
    kl_estimator: str = "k3"  # name in KL_ESTIMATORS
    entropy_coef: float = 0.0


@dataclass(frozen=True)
class ObjectiveInputs:
    logp: torch.Tensor  # [B, T] the trainer's log-probs of the sampled tokens, with gradient
    old_logp: torch.Tensor  # [B, T] pi_old: the trainer's before this batch's updates (logp.detach() if only one)
    rollout_logp: torch.Tensor  # [B, T] the generator's, stored with the samples
    advantages: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] 1 on trained tokens
    denominator: float  # the loss aggregation's denominator over the whole mini-batch
    ref_logp: torch.Tensor | None = None  # [B, T] the reference's, when a reference runs
    entropy: torch.Tensor | None = None  # [B, T] per-token entropy with gradient; needed when entropy_coef > 0
    on_policy: torch.Tensor | None = None  # [B] 1 for rows sampled by the weights the trainer holds; None = all


@dataclass(frozen=True)
class ObjectiveStats:
    """Sums over the tokens (or sequences) of the shards seen; `+` adds two (maxima take the max)."""

    tokens: float = 0.0  # trained tokens
    sequences: float = 0.0  # samples with at least one trained token
    loss_policy: float = 0.0  # this shard's share of the aggregated policy loss
    loss_kl: float = 0.0  # this shard's share of the aggregated KL to the reference (when in the loss)
    entropy: float = 0.0  # this shard's share of the aggregated entropy (when entropy_coef > 0)
    clipped: float = 0.0  # tokens where the policy loss's clip was active
    policy_kl: float = 0.0  # sum of k3 KL(pi_old || pi) per token: how far the update has moved
    ratio_dev_max: float = 0.0  # max |ratio - 1| over the tokens (0 on a batch's first update)
    weight: float = 0.0  # sum of the correction's weights
    changed_tokens: float = 0.0  # tokens whose weight the correction truncated or masked
    changed_sequences: float = 0.0  # samples with at least one such token
    mismatch_kl: float = 0.0  # sum of k3 KL(pi_rollout || pi_old) on the sampled tokens
    mismatch_ratio_max: float = 0.0  # the largest rho_t = pi_old / pi_rollout
    gap: float = 0.0  # sum of |old_logp - rollout_logp| on on-policy rows' tokens
    gap_tokens: float = 0.0  # the tokens `gap` sums over
    kl_ref: float | None = None  # sum of k3 KL(pi_old || pi_ref) per token, when a reference runs

    def __add__(self, other: ObjectiveStats) -> ObjectiveStats:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name.endswith("_max"):
                out[f.name] = max(a, b)
            elif a is None or b is None:
                out[f.name] = b if a is None else a
            else:
                out[f.name] = a + b
        return ObjectiveStats(**out)

    def metrics(self, optimizer_steps: float) -> dict[str, float]:
        """The logged figures: the losses per optimizer step, the rest per token or sequence."""
        per_token, per_seq = 1.0 / max(self.tokens, 1.0), 1.0 / max(self.sequences, 1.0)
        m = {
            "loss/policy": self.loss_policy / optimizer_steps,
            "loss/kl": self.loss_kl / optimizer_steps,
            "policy/entropy": self.entropy / optimizer_steps,
            "policy/clip_frac": self.clipped * per_token,
            "policy/approx_kl": self.policy_kl * per_token,
            "correction/weight": self.weight * per_token,
            "correction/changed_token_frac": self.changed_tokens * per_token,
            "correction/changed_seq_frac": self.changed_sequences * per_seq,
            "mismatch/kl": self.mismatch_kl * per_token,
            "mismatch/ratio_max": self.mismatch_ratio_max,
        }
        if self.gap_tokens:  # only samples of the weights the trainer holds: older ones differ by design
            m["sync/logprob_gap"] = self.gap / self.gap_tokens
        if self.kl_ref is not None:
            m["kl/ref"] = self.kl_ref * per_token
        return m


@dataclass(frozen=True)
class ObjectiveOutput:
    loss: torch.Tensor  # scalar: this shard's share of the mini-batch's loss
    stats: ObjectiveStats


def policy_objective(x: ObjectiveInputs, s: ObjectiveSettings) -> ObjectiveOutput:
    """The loss of one shard of a mini-batch and its statistics (see the module docstring for the math)."""
    mask = x.mask.float()
    loss_fn, correct = POLICY_LOSSES[s.policy_loss], CORRECTIONS[s.correction]
    out = loss_fn(x.logp, x.old_logp, x.advantages, mask, s.loss_params)
    corr = correct(x.old_logp, x.rollout_logp, mask, s.correction_params)
    pg_loss = aggregate(out.loss * corr.weight, mask, s.loss_agg, x.denominator)
    loss, kl_loss, entropy = pg_loss, 0.0, 0.0
    if s.kl_coef > 0:
        if x.ref_logp is None:
            raise ValueError("kl_coef > 0 puts the KL to the reference in the loss, but no reference log-probs came")
        kl = aggregate(KL_ESTIMATORS[s.kl_estimator](x.logp, x.ref_logp), mask, s.loss_agg, x.denominator)
        loss, kl_loss = loss + s.kl_coef * kl, kl.item()
    if s.entropy_coef > 0:  # the bonus: higher entropy lowers the loss
        if x.entropy is None:
            raise ValueError("entropy_coef > 0 needs the per-token entropy (ObjectiveInputs.entropy)")
        ent = aggregate(x.entropy, mask, s.loss_agg, x.denominator)
        loss, entropy = loss - s.entropy_coef * ent, ent.item()

    with torch.no_grad():
        on = mask > 0
        rows = on.any(-1)
        old, rollout = x.old_logp.detach(), x.rollout_logp.detach()
        rho = token_ratio(old, rollout)
        fresh = mask if x.on_policy is None else mask * x.on_policy.float().to(mask.device)[:, None]
        changed = corr.changed & on
        stats = ObjectiveStats(
            tokens=mask.sum().item(),
            sequences=rows.sum().item(),
            loss_policy=pg_loss.item(),
            loss_kl=kl_loss,
            entropy=entropy,
            clipped=(out.clipped & on).sum().item(),
            policy_kl=(KL_ESTIMATORS["k3"](x.logp.detach(), old) * mask).sum().item(),
            ratio_dev_max=_masked_max((out.ratio.detach() - 1).abs(), on),
            weight=(corr.weight * mask).sum().item(),
            changed_tokens=changed.sum().item(),
            changed_sequences=changed.any(-1).sum().item(),
            mismatch_kl=(KL_ESTIMATORS["k3"](rollout, old) * mask).sum().item(),
            mismatch_ratio_max=_masked_max(rho, on),
            gap=((old - rollout).abs() * fresh).sum().item(),
            gap_tokens=fresh.sum().item(),
            kl_ref=None if x.ref_logp is None else (KL_ESTIMATORS["k3"](old, x.ref_logp) * mask).sum().item(),
        )
    return ObjectiveOutput(loss=loss, stats=stats)


def _masked_max(values: torch.Tensor, on: torch.Tensor) -> float:
    return values[on].max().item() if on.any() else 0.0
