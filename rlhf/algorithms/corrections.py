"""Off-policy corrections for the rollout-vs-trainer mismatch, on per-token tensors [B, T].

The samples were drawn by the rollout policy (the generator: its weights may be some versions
behind in async mode, and its kernels differ slightly from the trainer's even on the same weights);
the policy loss takes its ratio against pi_old, the trainer's policy before this batch's updates.
Each correction turns the ratio rho_t = pi_old(y_t) / pi_rollout(y_t) into a per-token weight on the
loss, without gradient. Every correction shares one signature,
`(old_logp, rollout_logp, mask, params) -> Correction`, and declares the CorrectionParams fields it
`reads` and its `level`: "token" (each
token's own rho_t) or "sequence" (one value per sample, from the geometric mean of its ratios,
rho_i = exp(mean over the sample's mask tokens of (old_logp - rollout_logp))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algorithms.registry import Registry


@dataclass(frozen=True)
class CorrectionParams:
    tis_cap: float = 2.0  # token_tis / seq_tis: weights truncated at this cap (>= 1)
    band_low: float = 0.5  # token_mask / seq_mask: ratios outside [band_low, band_high] are masked out
    band_high: float = 2.0


@dataclass(frozen=True)
class Correction:
    weight: torch.Tensor  # [B, T] per-token weight on the loss, no gradient (0 = masked out)
    changed: torch.Tensor  # [B, T] bool: the correction changed this token's weight from rho (truncated or masked)


CORRECTIONS: Registry = Registry("off-policy correction")


def token_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """rho_t = pi_old / pi_rollout per token [B, T], no gradient."""
    return torch.exp(old_logp - rollout_logp).detach()


def sequence_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rho_i, the geometric mean of a sample's token ratios over its mask [B, 1] (1 for an empty row)."""
    mask = mask.float()
    log_rho = ((old_logp - rollout_logp).detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return torch.exp(log_rho)[:, None]


@CORRECTIONS.register("none", level="token", reads=frozenset())
def no_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                  params: CorrectionParams) -> Correction:
    """Weight 1 everywhere: the samples are treated as drawn from pi_old."""
    ones = torch.ones_like(old_logp)
    return Correction(weight=ones, changed=torch.zeros_like(ones, dtype=torch.bool))


@CORRECTIONS.register("token_tis", level="token", reads=frozenset({"tis_cap"}))
def token_tis(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
              params: CorrectionParams) -> Correction:
    """Truncated IS per token (Espeholt et al. 2018; Yao et al. 2025): w_t = min(rho_t, tis_cap).

    Weighting each token's loss by rho_t makes the gradient that of samples drawn from pi_old;
    truncating at the cap bounds its variance.
    """
    _check_cap(params.tis_cap)
    rho = token_ratio(old_logp, rollout_logp)
    return Correction(weight=rho.clamp(max=params.tis_cap), changed=rho > params.tis_cap)


@CORRECTIONS.register("token_mask", level="token", reads=frozenset({"band_low", "band_high"}))
def token_mask(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
               params: CorrectionParams) -> Correction:
    """Masked IS per token (IcePop, Ling team 2025): w_t = rho_t inside [band_low, band_high], else 0.

    A token on which the two policies disagree by more than the band is dropped from the gradient
    instead of being down- or up-weighted: such tokens are where the mismatch, not the data, drives
    the update. It stays in the loss's denominator (it is a trained token that contributes nothing).
    """
    _check_band(params)
    rho = token_ratio(old_logp, rollout_logp)
    outside = (rho < params.band_low) | (rho > params.band_high)
    return Correction(weight=torch.where(outside, torch.zeros_like(rho), rho), changed=outside)


@CORRECTIONS.register("seq_tis", level="sequence", reads=frozenset({"tis_cap"}))
def seq_tis(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
            params: CorrectionParams) -> Correction:
    """Truncated IS per sequence: every token of sample i weighs w_i = min(rho_i, tis_cap).

    rho_i is the geometric mean of the token ratios (the length-normalised sequence ratio, as GSPO's),
    so a long sample's weight does not explode or vanish with its length.
    """
    _check_cap(params.tis_cap)
    rho = sequence_ratio(old_logp, rollout_logp, mask).expand_as(old_logp)
    return Correction(weight=rho.clamp(max=params.tis_cap), changed=rho > params.tis_cap)


@CORRECTIONS.register("seq_mask", level="sequence", reads=frozenset({"band_low", "band_high"}))
def seq_mask(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
             params: CorrectionParams) -> Correction:
    """Sequence masking (rejection) by the geometric-mean ratio: weight 1 for a sample whose rho_i is
    inside [band_low, band_high], 0 for every token of one outside it (veRL's geometric rejection)."""
    _check_band(params)
    rho = sequence_ratio(old_logp, rollout_logp, mask).expand_as(old_logp)
    outside = (rho < params.band_low) | (rho > params.band_high)
    return Correction(weight=(~outside).to(old_logp.dtype), changed=outside)


def _check_cap(cap: float) -> None:
    if cap < 1:
        raise ValueError(f"the truncated-IS cap must be >= 1 (a cap below 1 down-weights on-policy tokens), got {cap}")


def _check_band(params: CorrectionParams) -> None:
    if not 0 <= params.band_low <= 1 <= params.band_high:
        raise ValueError(f"the IS band must satisfy 0 <= band_low <= 1 <= band_high, got "
                         f"[{params.band_low}, {params.band_high}]")
