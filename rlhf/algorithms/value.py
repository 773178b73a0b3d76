"""The critic's loss for PPO with a value head, on per-token tensors [B, T]. Targets come from `gae_returns`."""

from __future__ import annotations

import torch


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range: float | None) -> torch.Tensor:
    """Per-token clipped value loss [B, T] (unmasked; aggregate with the mask via `aggregate`).

    loss_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2), c = clip_range,
    as in OpenAI's baselines PPO2 (the PPO paper itself states no value clipping). The max makes it
    pessimistic: moving V more than c away from V_old never lowers the loss. clip_range=None gives
    the plain 0.5 * (V_t - R_t)^2.
    values: the critic now; old_values: the critic when the rollout was scored; returns: gae_returns.
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * unclipped
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 or None (no clipping), got {clip_range}")
    moved = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * torch.maximum(unclipped, (moved - returns) ** 2)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 is a perfect critic, 0 a constant one."""
    m = mask.bool()
    r, v = returns[m], values[m]
    var = r.var(unbiased=False)
    return float("nan") if var == 0 else (1 - (r - v).var(unbiased=False) / var).item()
