"""Length-based reward shaping and truncation handling (DAPO, Yu et al. 2025), applied after scoring."""

from __future__ import annotations

import torch

from rlhf.algorithms import overlong_penalty
from rlhf.config import AlgorithmConfig
from rlhf.types import Sample, TrainBatch


def shape_rewards(samples: list[Sample], a: AlgorithmConfig, max_new_tokens: int) -> dict[str, float]:
    """Add DAPO's soft overlong penalty and/or the truncation penalty to each sample's reward, in place.

    Each added term is recorded in the sample's reward_components ("overlong", "truncated").
    """
    m: dict[str, float] = {}
    if a.overlong_buffer > 0:
        lengths = torch.tensor([len(s.completion_ids) for s in samples])
        penalties = overlong_penalty(lengths, max_new_tokens, a.overlong_buffer).tolist()
        for s, p in zip(samples, penalties):
            s.reward += p
            s.reward_components["overlong"] = p
        m["reward/overlong/mean"] = sum(penalties) / len(penalties)
    if a.truncated == "penalize":
        for s in samples:
            if s.truncated:
                s.reward += a.truncated_penalty
                s.reward_components["truncated"] = a.truncated_penalty
    return m


def mask_truncated(batch: TrainBatch, samples: list[Sample]) -> TrainBatch:
    """truncated=mask: samples cut off by max_new_tokens contribute no tokens to the loss."""
    keep = torch.tensor([0.0 if s.truncated else 1.0 for s in samples]).unsqueeze(1)
    return batch.with_(loss_mask=batch.loss_mask * keep)
