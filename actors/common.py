"""What the model-hosting actors share: batched log-prob forwards (their devices: rlhf/devices.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf.algorithms import token_logprobs
from rlhf.types import TrainBatch


def micro_logits(model: torch.nn.Module, mb: TrainBatch, device: torch.device,
                 share_prompts: bool = False) -> torch.Tensor:
    """Logits [b, t-1, V] scoring each next token of one micro-batch (grad flows if enabled). The last
    position scores no token, so it is not run (causal attention: the other logits do not depend on it).

    With share_prompts, rows with the same prompt (GRPO's group) run that prompt once: see
    shared_prompt_logits. Only the columns that score completion tokens are computed then; the
    others are 0, which every caller masks out.
    """
    if share_prompts and mb.prompt_lengths is not None:
        plan = SharedPrompts.of(mb.input_ids, mb.prompt_lengths, mb.attention_mask.sum(-1))
        if plan.saves_tokens():
            return shared_prompt_logits(model, mb.input_ids, plan, device)
    out = model(input_ids=mb.input_ids[:, :-1].to(device), attention_mask=mb.attention_mask[:, :-1].to(device),
                use_cache=False)
    return out.logits


def micro_logprobs(model: torch.nn.Module, mb: TrainBatch, temperature: float, device: torch.device,
                   share_prompts: bool = False) -> torch.Tensor:
    """Log-probs [b, t-1] of each next token of one micro-batch under `model` (grad flows if enabled)."""
    return token_logprobs(micro_logits(model, mb, device, share_prompts), mb.input_ids[:, 1:].to(device),
                          temperature)


@dataclass(frozen=True)
class SharedPrompts:
    """How a micro-batch's rows share prompts: which rows run which unique prompt, and where each
    scored column's logits come from. All index tensors live on the CPU."""

    prompt_ids: torch.Tensor  # [U, Pmax] the unique prompts, right-padded with 0
    prompt_lengths: torch.Tensor  # [U]
    row_prompt: torch.Tensor  # [B] which unique prompt each row continues
    completion_ids: torch.Tensor  # [B, C] each row's tokens after its prompt, right-padded with 0
    completion_lengths: torch.Tensor  # [B]
    # [B, T-1] index into cat(prompt-end logits [U], completion logits [B*(C-1)], a zero row)
    source: torch.Tensor

    @classmethod
    def of(cls, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, lengths: torch.Tensor) -> SharedPrompts:
        """input_ids [B, T] right-padded prompt + completion, prompt_lengths [B], lengths [B] real tokens."""
        b, t = input_ids.shape
        unique: dict[tuple[int, ...], int] = {}
        row_prompt = []
        for i in range(b):
            key = tuple(input_ids[i, : int(prompt_lengths[i])].tolist())
            row_prompt.append(unique.setdefault(key, len(unique)))
        u, p_max = len(unique), max(len(k) for k in unique)
        prompt_ids = torch.zeros((u, p_max), dtype=input_ids.dtype)
        for key, j in unique.items():
            prompt_ids[j, : len(key)] = torch.tensor(key, dtype=input_ids.dtype)
        completion_lengths = lengths - prompt_lengths
        c = max(int(completion_lengths.max()), 1)
        completion_ids = torch.zeros((b, c), dtype=input_ids.dtype)
        # Column k of the result scores token k+1. A row's first completion token is scored by its
        # prompt's last position; its completion token j (j >= 1) by completion position j-1. The last
        # completion position scores nothing and is not run: C-1 positions per row.
        zero_row = u + b * (c - 1)
        source = torch.full((b, t - 1), zero_row, dtype=torch.long)
        for i in range(b):
            p, n = int(prompt_lengths[i]), int(completion_lengths[i])
            completion_ids[i, :n] = input_ids[i, p : p + n]
            if n > 0:
                source[i, p - 1] = row_prompt[i]
                source[i, p : p + n - 1] = u + i * (c - 1) + torch.arange(n - 1)
        return cls(prompt_ids, torch.tensor([len(k) for k in unique]), torch.tensor(row_prompt), completion_ids,
                   completion_lengths, source)

    def saves_tokens(self) -> bool:
        """Whether some prompt is shared by several rows (otherwise one plain forward is cheaper)."""
        return self.prompt_ids.shape[0] < self.row_prompt.shape[0]


def shared_prompt_logits(model: torch.nn.Module, input_ids: torch.Tensor, plan: SharedPrompts,
                         device: torch.device) -> torch.Tensor:
    """micro_logits with each unique prompt run once: the prompts' forward fills a KV cache, which is
    repeated per row and continued by the completions' forward. Gradients flow back through the
    cache into the shared prompt forward, so the result and its gradients equal those of one forward
    over every row (up to float rounding), at the cost of the prompt tokens once per group instead of
    once per sample. HF causal LMs (and peft wrappers of them) take past_key_values and position_ids."""
    from transformers import DynamicCache

    u, p_max = plan.prompt_ids.shape
    prompt_mask = (torch.arange(p_max)[None, :] < plan.prompt_lengths[:, None]).long()
    cache = DynamicCache()
    prompt_out = model(input_ids=plan.prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                       past_key_values=cache, use_cache=True)
    prompt_end = prompt_out.logits[torch.arange(u), plan.prompt_lengths - 1]  # [U, V]
    cache = prompt_out.past_key_values
    cache.batch_select_indices(plan.row_prompt.to(device))  # [U, ...] -> [B, ...], differentiable
    b, c = plan.completion_ids.shape
    parts = [prompt_end]
    if c > 1:  # completion positions 0 .. C-2; the last scores nothing
        completion_mask = (torch.arange(c - 1)[None, :] < plan.completion_lengths[:, None]).long()
        mask = torch.cat([prompt_mask[plan.row_prompt], completion_mask], dim=1)
        positions = plan.prompt_lengths[plan.row_prompt][:, None] + torch.arange(c - 1)[None, :]
        out = model(input_ids=plan.completion_ids[:, :-1].to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), past_key_values=cache, use_cache=True)
        parts.append(out.logits.reshape(b * (c - 1), -1))  # [B, C-1, V] -> rows
    table = torch.cat([*parts, prompt_end.new_zeros(1, prompt_end.shape[-1])])
    return table[plan.source.to(device)]


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, batch: TrainBatch, temperature: float, micro_batch_size: int,
                   device: torch.device, share_prompts: bool = False) -> torch.Tensor:
    """Log-probs [B, T-1] of a whole batch, micro-batch by micro-batch; 0 off the loss mask."""
    width = batch.loss_mask.shape[1]
    parts = []
    for mb in batch.chunks(max(1, math.ceil(batch.size / micro_batch_size))):
        lp = micro_logprobs(model, mb, temperature, device, share_prompts).float().cpu() * mb.loss_mask
        parts.append(torch.nn.functional.pad(lp, (0, width - lp.shape[1])))
    return torch.cat(parts)
