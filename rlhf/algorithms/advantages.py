"""Advantage estimators. Each takes an `EstimatorInputs` and returns token-level advantages [B, T], 0 off the mask.

Samples of one prompt are contiguous: rows g*G .. g*G + G - 1 form group g (G = group_size).

Two kinds live here. Outcome estimators (grpo, dr_grpo, rloo) turn the G rewards of a group into one
scalar per sample and broadcast it over the sample's completion tokens. `token_rewards` (e.g. a KL
penalty from `kl_penalty_rewards`), if given, are summed over the sample's mask and folded into its
reward before the group statistics (`sequence_rewards`): the sequence-level KL-in-reward of
REINFORCE++-baseline and of OpenRLHF's GRPO with a KL reward. Token estimators (reinforce_pp,
reinforce_pp_baseline, gae) work on a per-token reward: `token_rewards` plus the outcome reward on
the sample's last completion token, and also read `gamma` (and `lam`, `values`).

Each estimator declares, at registration, the optional inputs it `reads` (of token_rewards, values,
gamma, lam): the config refuses a setting that the chosen estimator would ignore, naming the keys.

A row's completion tokens are the columns where the mask is 1. They need not start at column 0 (in
`rlhf.types.collate` they follow the prompt's columns); the token estimators walk only those columns,
so the token after column t is the next column with mask 1, and nothing comes after the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlhf.algorithms.registry import Registry


@dataclass(frozen=True)
class EstimatorInputs:
    rewards: torch.Tensor  # [B] one scalar reward per sample (outcome reward)
    mask: torch.Tensor  # [B, T] 1 on completion tokens that are trained
    group_size: int  # G: samples per prompt; B % G == 0
    std_eps: float = 1e-6
    values: torch.Tensor | None = None  # [B, T] critic's V at each mask column ("gae" only); read on the mask
    token_rewards: torch.Tensor | None = None  # [B, T] per-token reward, e.g. a KL penalty; read on the mask
    gamma: float = 1.0  # discount per completion token (token estimators)
    lam: float = 1.0  # GAE's lambda ("gae" only)


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")


def grouped_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [B] as [B/G, G] float, one row per prompt group."""
    b = rewards.shape[0]
    if b % group_size:
        raise ValueError(f"batch of {b} rewards is not a whole number of groups of {group_size}")
    return rewards.float().view(b // group_size, group_size)


def sequence_rewards(x: EstimatorInputs) -> torch.Tensor:
    """[B] each sample's reward plus its token rewards summed over its mask (just the reward without them)."""
    if x.token_rewards is None:
        return x.rewards.float()
    return x.rewards.float() + (x.token_rewards.float() * x.mask.float()).sum(-1)


def token_level_rewards(x: EstimatorInputs) -> torch.Tensor:
    """[B, T] per-token reward: token_rewards (if any) plus rewards[i] on row i's last mask column; 0 off the mask.

    A row with no mask column gets no reward anywhere (its reward has no token to land on).
    """
    mask = x.mask.float()
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # argmax returns the first maximum: the last 1
    outcome = torch.zeros_like(mask).scatter(1, last.unsqueeze(1), x.rewards.float().unsqueeze(1))
    r = outcome * mask
    if x.token_rewards is not None:
        r = r + x.token_rewards.float() * mask
    return r


def discounted_sum(x: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """out_t = x_t + discount * out_next(t) on the mask, where next(t) is the next mask column (0 past the last).

    x, mask: [B, T]. Returns [B, T], 0 off the mask. Columns off the mask neither add to nor break the sum.
    """
    mask = mask.float()
    running = torch.zeros_like(x[:, 0])
    out = []
    for t in reversed(range(x.shape[1])):
        on = mask[:, t] > 0
        running = torch.where(on, x[:, t] + discount * running, running)
        out.append(running * mask[:, t])
    return torch.stack(out[::-1], dim=1)


def whiten_over_mask(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) with mean and population std over every mask token of the batch; 0 if std is 0."""
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    std = ((((x - mean) * mask) ** 2).sum() / n).sqrt()
    whitened = torch.where(std > 0, (x - mean) / (std + eps), torch.zeros_like(x))  # no 0/0 at eps 0
    return whitened * mask


@ADVANTAGE_ESTIMATORS.register("grpo", reads=frozenset({"token_rewards"}))
def grpo(x: EstimatorInputs) -> torch.Tensor:
    """GRPO (Shao et al. 2024, outcome supervision): A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    The std is the unbiased sample std over the G rewards of the group, as in the paper's reference
    code and TRL; a group whose rewards are all equal gets advantage 0 for every sample. The scalar
    advantage is broadcast over the sample's completion tokens.
    """
    r = grouped_rewards(sequence_rewards(x), x.group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    adv = torch.where(std > 0, centered / (std + x.std_eps), torch.zeros_like(centered))  # no 0/0 at eps 0
    return adv.reshape(-1, 1) * x.mask


@ADVANTAGE_ESTIMATORS.register("dr_grpo", reads=frozenset({"token_rewards"}))
def dr_grpo(x: EstimatorInputs) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i - mean(r_group), GRPO without the division by the group std.

    The paper's other change, dropping the 1/|o_i| length normalisation, is a loss aggregation, not an
    advantage: pair this with the "seq-mean-token-sum-norm" aggregation.
    """
    r = grouped_rewards(sequence_rewards(x), x.group_size)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1, 1) * x.mask


@ADVANTAGE_ESTIMATORS.register("rloo", reads=frozenset({"token_rewards"}))
def rloo(x: EstimatorInputs) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - mean of the other G - 1 rewards of the group.

    Computed as G / (G - 1) * (r_i - mean(r_group)), which is the same number. Needs G >= 2.
    """
    g = x.group_size
    if g < 2:
        raise ValueError(f"rloo needs at least 2 samples per prompt for a leave-one-out baseline; group_size={g}")
    r = grouped_rewards(sequence_rewards(x), g)
    return (g / (g - 1) * (r - r.mean(dim=1, keepdim=True))).reshape(-1, 1) * x.mask


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", reads=frozenset({"token_rewards", "gamma"}))
def reinforce_pp(x: EstimatorInputs) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): discounted return per token, normalised over every valid token of the batch.

    r_t = token_rewards_t (+ outcome reward on the last token);  G_t = sum_k gamma^k r_{t+k}  (no critic);
    A_t = (G_t - mean(G)) / (std(G) + std_eps), mean and std over all mask tokens of all B samples.
    The std is the population std (divide by the token count), as in OpenRLHF's implementation, which
    divides by sqrt(var + eps) where we divide by std + eps, like grpo; if std is 0 every advantage is 0.
    "Global" means this call's batch: call it on the whole rollout batch, before splitting into shards.
    """
    returns = discounted_sum(token_level_rewards(x), x.mask, x.gamma)
    return whiten_over_mask(returns, x.mask, x.std_eps)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", reads=frozenset({"token_rewards", "gamma"}))
def reinforce_pp_baseline(x: EstimatorInputs) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025): reinforce_pp with the group mean subtracted from the outcome reward first.

    r_i <- r_i - mean(r_group); then r_t, G_t and the global normalisation exactly as in reinforce_pp.
    Only the outcome reward is centred; token_rewards (e.g. a KL penalty) are added as they are, as in
    OpenRLHF. The paper puts the KL term in the loss for this variant; pass no token_rewards to do that.
    """
    r = grouped_rewards(x.rewards, x.group_size)
    centered = (r - r.mean(dim=1, keepdim=True)).reshape(-1)
    return reinforce_pp(replace(x, rewards=centered))


@ADVANTAGE_ESTIMATORS.register("gae", reads=frozenset({"token_rewards", "gamma", "lam", "values"}))
def gae(x: EstimatorInputs) -> torch.Tensor:
    """Generalized Advantage Estimation (Schulman et al. 2016) with a critic, per sample over its mask columns.

    r_t = token_rewards_t (+ outcome reward on the last token);  delta_t = r_t + gamma * V_next(t) - V_t,
    with V_next(t) the value at the next mask column, 0 after the last (the episode ends there);
    A_t = sum_k (gamma * lam)^k delta_{t+k}. No normalisation (PPO implementations often whiten A over
    the batch afterwards; that is left to the caller). The value target is `gae_returns(A, values, mask)`.
    values[:, t] must be the critic's estimate at the same position whose logits score token t.
    """
    if x.values is None:
        raise ValueError("gae needs critic values: EstimatorInputs(values=...) of shape [B, T], got None")
    if x.values.shape != x.mask.shape:
        raise ValueError(f"gae: values has shape {tuple(x.values.shape)}, mask has {tuple(x.mask.shape)}")
    mask = x.mask.float()
    v = x.values.float() * mask
    deltas = token_level_rewards(x) + x.gamma * _next_on_mask(v, mask) - v
    return discounted_sum(deltas, mask, x.gamma * x.lam)


def _next_on_mask(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T]: at column t, v at the next mask column after t (0 if there is none)."""
    carry = torch.zeros_like(v[:, 0])
    out = []
    for t in reversed(range(v.shape[1])):
        out.append(carry)
        carry = torch.where(mask[:, t] > 0, v[:, t], carry)
    return torch.stack(out[::-1], dim=1)


def gae_returns(advantages: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The critic's regression target R_t = A_t + V_t (the lambda-return), [B, T], 0 off the mask.

    advantages must be gae's unnormalised output for the same values.
    """
    return (advantages + values.float()) * mask.float()
