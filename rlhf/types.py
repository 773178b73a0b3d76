"""The data that travels between actors. Shapes: B samples, P prompt tokens, L completion tokens,
T = longest prompt + completion in the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Prompt:
    index: int  # row of the dataset it came from
    text: str  # the prompt as the reward functions see it
    ids: list[int]  # [P] token ids given to the generator
    row: dict[str, Any]  # the dataset row's other columns, passed to reward functions by name


@dataclass
class Sample:
    """One completion of one prompt, as the generator produced it."""

    prompt: Prompt
    completion_ids: list[int]  # [L] including the EOS token when generation stopped on it
    rollout_logprobs: list[float]  # [L] the generator's log-prob of each completion token
    text: str  # decoded completion
    truncated: bool  # stopped by max_new_tokens, not by EOS
    policy_version: int  # version of the weights that generated it
    generator: int  # index of the generator that produced it
    reward: float = math.nan  # set by the reward stage
    reward_components: dict[str, float] = field(default_factory=dict)


@dataclass
class SampleGroup:
    """The samples_per_prompt completions of one prompt (GRPO's group)."""

    prompt: Prompt
    samples: list[Sample]


@dataclass(frozen=True)
class TrainBatch:
    """Padded tensors for the trainer. Column t of the [B, T-1] fields scores token input_ids[:, t+1]."""

    input_ids: torch.Tensor  # [B, T] prompt then completion, right-padded
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    loss_mask: torch.Tensor  # [B, T-1] 1 where the scored token is a completion token
    rollout_logprobs: torch.Tensor  # [B, T-1] the generator's log-probs (0 off the mask)
    old_logprobs: torch.Tensor | None = None  # [B, T-1] the trainer's log-probs before this step's updates
    ref_logprobs: torch.Tensor | None = None  # [B, T-1] the frozen reference's log-probs
    advantages: torch.Tensor | None = None  # [B, T-1]
    values: torch.Tensor | None = None  # [B, T-1] the critic's values when the batch was scored (gae)
    returns: torch.Tensor | None = None  # [B, T-1] the critic's regression targets
    loss_denominator: float = 0.0  # of the whole mini-batch this is a shard of (rlhf.algorithms.aggregate)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> TrainBatch:
        """The given rows, with padding columns that no selected row uses trimmed away."""
        picked = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in self._fields().items()}
        width = int(picked["attention_mask"].sum(-1).max().item()) if picked["input_ids"].shape[0] else 1
        return TrainBatch(**{k: _trim(k, v, width) for k, v in picked.items()})

    def with_(self, **changes: Any) -> TrainBatch:
        return replace(self, **changes)

    def chunks(self, n: int) -> list[TrainBatch]:
        """n contiguous parts of (near) equal size."""
        bounds = [round(i * self.size / n) for i in range(n + 1)]
        return [self.select(slice(bounds[i], bounds[i + 1])) for i in range(n)]

    def _fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _trim(name: str, v: Any, width: int) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    return v[:, :width] if name in ("input_ids", "attention_mask") else v[:, : width - 1]


def collate(samples: list[Sample], pad_id: int) -> TrainBatch:
    """Right-pad prompt + completion of every sample into one TrainBatch."""
    width = max(len(s.prompt.ids) + len(s.completion_ids) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    loss_mask = torch.zeros((b, width - 1), dtype=torch.float32)
    rollout_logprobs = torch.zeros((b, width - 1), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, n = len(s.prompt.ids), len(s.completion_ids)
        input_ids[i, : p + n] = torch.tensor(s.prompt.ids + s.completion_ids, dtype=torch.long)
        attention_mask[i, : p + n] = 1
        loss_mask[i, p - 1 : p - 1 + n] = 1.0  # column p-1 scores the first completion token
        rollout_logprobs[i, p - 1 : p - 1 + n] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    return TrainBatch(input_ids, attention_mask, loss_mask, rollout_logprobs)
