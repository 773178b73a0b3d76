"""KL(pi || pi_ref) estimators from per-token log-probabilities of tokens sampled from pi (Schulman, 2020).

With log_r = ref_logp - logp:  k1 = -log_r (unbiased, high variance), k2 = log_r^2 / 2 (biased,
low variance), k3 = exp(log_r) - 1 - log_r (unbiased, low variance, always >= 0).
"""

from __future__ import annotations

import torch

from rlhf.algorithms.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logp - logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_r = ref_logp - logp
    return torch.exp(log_r) - 1.0 - log_r


def kl_penalty_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                       estimator: str = "k1") -> torch.Tensor:
    """KL to the reference as a per-token reward (InstructGPT-style): -kl_coef * KL_t, [B, T], 0 off the mask.

    For `EstimatorInputs.token_rewards`; the estimators add the outcome reward on the last token.
    The KL then enters the advantage, not the loss, so set the loss's own KL coefficient to 0.
    k1 is the usual choice here: summed over a sample it is an unbiased estimate of the sequence KL.
    """
    return -kl_coef * KL_ESTIMATORS[estimator](logp, ref_logp) * mask
