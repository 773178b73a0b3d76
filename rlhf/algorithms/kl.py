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
