"""Advantage estimators. Each takes an `EstimatorInputs` and returns token-level advantages [B, T].

Samples of one prompt are contiguous: rows g*G .. g*G + G - 1 form group g (G = group_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algorithms.registry import Registry


@dataclass(frozen=True)
class EstimatorInputs:
    rewards: torch.Tensor  # [B] one scalar reward per sample (outcome reward)
    mask: torch.Tensor  # [B, T] 1 on completion tokens that are trained
    group_size: int  # G: samples per prompt; B % G == 0
    std_eps: float = 1e-6


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")


def _groups(x: EstimatorInputs) -> torch.Tensor:
    b = x.rewards.shape[0]
    if b % x.group_size:
        raise ValueError(f"batch of {b} rewards is not a whole number of groups of {x.group_size}")
    return x.rewards.float().view(b // x.group_size, x.group_size)  # [B/G, G]


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(x: EstimatorInputs) -> torch.Tensor:
    """GRPO (Shao et al. 2024, outcome supervision): A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    The std is the unbiased sample std over the G rewards of the group, as in the paper's reference
    code and TRL; a group whose rewards are all equal gets advantage 0 for every sample. The scalar
    advantage is broadcast over the sample's completion tokens.
    """
    r = _groups(x)
    centered = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    adv = torch.where(std > 0, centered / (std + x.std_eps), torch.zeros_like(centered))  # no 0/0 at eps 0
    return adv.reshape(-1, 1) * x.mask
