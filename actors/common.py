"""What the model-hosting actors share: devices and batched log-prob forwards."""

from __future__ import annotations

import math

import torch

from rlhf.algorithms import token_logprobs
from rlhf.types import TrainBatch


def torch_device(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def micro_logits(model: torch.nn.Module, mb: TrainBatch, device: torch.device) -> torch.Tensor:
    """Logits [b, t-1, V] scoring each next token of one micro-batch (grad flows if enabled)."""
    out = model(input_ids=mb.input_ids.to(device), attention_mask=mb.attention_mask.to(device), use_cache=False)
    return out.logits[:, :-1]


def micro_logprobs(model: torch.nn.Module, mb: TrainBatch, temperature: float, device: torch.device) -> torch.Tensor:
    """Log-probs [b, t-1] of each next token of one micro-batch under `model` (grad flows if enabled)."""
    return token_logprobs(micro_logits(model, mb, device), mb.input_ids[:, 1:].to(device), temperature)


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, batch: TrainBatch, temperature: float, micro_batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Log-probs [B, T-1] of a whole batch, micro-batch by micro-batch; 0 off the loss mask."""
    width = batch.loss_mask.shape[1]
    parts = []
    for mb in batch.chunks(max(1, math.ceil(batch.size / micro_batch_size))):
        lp = micro_logprobs(model, mb, temperature, device).float().cpu() * mb.loss_mask
        parts.append(torch.nn.functional.pad(lp, (0, width - lp.shape[1])))
    return torch.cat(parts)
