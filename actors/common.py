"""What the model-hosting actors share: batched log-prob forwards (their devices: rlhf/devices.py)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from rlhf.algorithms import entropy_from_logits, token_logprobs
from rlhf.types import TrainBatch


@dataclass(frozen=True)
class TokenScores:
    """Per next-token column of a micro-batch ([b, t-1], column k scores token k+1): the log-prob of the
    sampled token and, when asked for, the entropy of the distribution it was drawn from. Only columns
    that score a completion token are computed; the others (prompt, padding) are 0, which every caller
    masks out."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None


def micro_scores(model: torch.nn.Module, mb: TrainBatch, temperature: float, device: torch.device,
                 share_prompts: bool = False, entropy: bool = False) -> TokenScores:
    """TokenScores of one micro-batch under `model` (grad flows if enabled).

    The output layer and the log-softmax run only at the columns that score a completion token: at a
    49k vocabulary the logits of the prompt positions are most of a micro-batch's [b, t-1, V] tensor
    and of its log-softmax (and of their backward), and nothing reads them. With share_prompts, rows
    with the same prompt (GRPO's group) run that prompt once: see shared_prompt_rows.
    """
    rows, where = None, None
    if share_prompts and mb.prompt_lengths is not None:
        plan = SharedPrompts.of(mb.input_ids, mb.prompt_lengths, mb.attention_mask.sum(-1))
        if plan.saves_tokens():
            rows, where = shared_prompt_rows(model, plan, mb.input_ids.shape[1], device)
    if rows is None:
        rows, where = plain_rows(model, mb, device)
    b, width = mb.input_ids.shape[0], mb.input_ids.shape[1] - 1
    targets = mb.input_ids[:, 1:].reshape(-1)[where].to(device)
    where = where.to(device)

    def spread(values: torch.Tensor) -> torch.Tensor:  # [N] at the scored columns -> [b, t-1]
        return values.new_zeros(b * width).index_put((where,), values).view(b, width)

    logp = spread(token_logprobs(rows, targets, temperature))
    return TokenScores(logp, spread(entropy_from_logits(rows, temperature)) if entropy else None)


def scored_columns(mb: TrainBatch) -> torch.Tensor:
    """[b, t-1] bool: the columns that score a completion token (k from prompt length - 1 to length - 2);
    every real next token when the batch does not say where its prompts end."""
    real_next = mb.attention_mask[:, 1:].bool()
    if mb.prompt_lengths is None:
        return real_next
    cols = torch.arange(real_next.shape[1])[None, :]
    return real_next & (cols >= mb.prompt_lengths[:, None] - 1)


def plain_rows(model: torch.nn.Module, mb: TrainBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] of the scored columns, their flat indices into [b * (t-1)]) from one forward over
    every row. The last position scores no token, so it is not run (causal attention: the other logits
    do not depend on it); the output layer runs from the first scored column on (logits_to_keep)."""
    scored = scored_columns(mb)
    width = scored.shape[1]
    used = scored.any(0).nonzero()
    keep = width - int(used[0]) if len(used) else 1
    out = model(input_ids=mb.input_ids[:, :-1].to(device), attention_mask=mb.attention_mask[:, :-1].to(device),
                use_cache=False, **logits_to_keep(model, keep))
    window = scored[:, width - out.logits.shape[1]:]  # the model may have returned every column
    return out.logits[window.to(device)], scored.reshape(-1).nonzero().squeeze(-1)


def logits_to_keep(model: torch.nn.Module, keep: int | torch.Tensor) -> dict:
    """{"logits_to_keep": keep} where the HF model under any wrappers (DeepSpeed's engine, peft) takes it
    (transformers' causal LMs do: an int keeps the last positions, a 1-D tensor those positions), else {}."""
    inner = model
    while True:
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        else:
            break
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


@dataclass(frozen=True)
class SharedPrompts:
    """How a micro-batch's rows share prompts: which rows run which unique prompt, and which column of
    [b, t-1] each computed logit scores. All index tensors live on the CPU."""

    prompt_ids: torch.Tensor  # [U, Pmax] the unique prompts, right-padded with 0
    prompt_lengths: torch.Tensor  # [U]
    row_prompt: torch.Tensor  # [B] which unique prompt each row continues
    completion_ids: torch.Tensor  # [B, C] each row's tokens after its prompt, right-padded with 0
    completion_lengths: torch.Tensor  # [B]
    first_rows: torch.Tensor  # [R] the rows with a completion: their first token is scored at their prompt's end
    first_where: torch.Tensor  # [R] flat [B * (T-1)] index of that column
    rest: torch.Tensor  # [B, C-1] bool: completion position j of a row scores its token j+1
    rest_where: torch.Tensor  # [rest.sum()] flat index of those columns, in rest's row-major order

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
        for i in range(b):
            p, n = int(prompt_lengths[i]), int(completion_lengths[i])
            completion_ids[i, :n] = input_ids[i, p : p + n]
        # Column k scores token k+1. A row's first completion token is scored by its prompt's last
        # position (column p-1); its completion token j (j >= 1) by completion position j-1 (column
        # p+j-1). The last completion position scores nothing and is not run: C-1 positions per row.
        first_rows = (completion_lengths > 0).nonzero().squeeze(-1)
        rest = torch.arange(c - 1)[None, :] < (completion_lengths - 1)[:, None]
        row, j = rest.nonzero(as_tuple=True)
        return cls(prompt_ids, torch.tensor([len(k) for k in unique]), torch.tensor(row_prompt), completion_ids,
                   completion_lengths, first_rows, first_rows * (t - 1) + prompt_lengths[first_rows] - 1, rest,
                   row * (t - 1) + prompt_lengths[row] + j)

    def saves_tokens(self) -> bool:
        """Whether some prompt is shared by several rows (otherwise one plain forward is cheaper)."""
        return self.prompt_ids.shape[0] < self.row_prompt.shape[0]


def shared_prompt_rows(model: torch.nn.Module, plan: SharedPrompts, t: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """plain_rows' result with each unique prompt run once: the prompts' forward fills a KV cache (the
    output layer at each prompt's last position only), which is repeated per row and continued by the
    completions' forward. Gradients flow back through the cache into the shared prompt forward, so the
    result and its gradients equal those of one forward over every row (up to float rounding), at the
    cost of the prompt tokens once per group instead of once per sample. HF causal LMs (and peft
    wrappers of them) take past_key_values and position_ids."""
    from transformers import DynamicCache

    u, p_max = plan.prompt_ids.shape
    prompt_mask = (torch.arange(p_max)[None, :] < plan.prompt_lengths[:, None]).long()
    ends, end_of = torch.unique(plan.prompt_lengths - 1, return_inverse=True)
    keep = logits_to_keep(model, ends.to(device))
    prompt_out = model(input_ids=plan.prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                       past_key_values=DynamicCache(), use_cache=True, **keep)
    at = end_of if keep else plan.prompt_lengths - 1  # the column of each prompt's end in what came back
    prompt_end = prompt_out.logits[torch.arange(u), at.to(device)]  # [U, V]
    cache = prompt_out.past_key_values
    cache.batch_select_indices(plan.row_prompt.to(device))  # [U, ...] -> [B, ...], differentiable
    rows = [prompt_end[plan.row_prompt[plan.first_rows].to(device)]]
    b, c = plan.completion_ids.shape
    if c > 1:  # completion positions 0 .. C-2; the last scores nothing
        completion_mask = (torch.arange(c - 1)[None, :] < plan.completion_lengths[:, None]).long()
        mask = torch.cat([prompt_mask[plan.row_prompt], completion_mask], dim=1)
        positions = plan.prompt_lengths[plan.row_prompt][:, None] + torch.arange(c - 1)[None, :]
        out = model(input_ids=plan.completion_ids[:, :-1].to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), past_key_values=cache, use_cache=True)
        rows.append(out.logits[plan.rest.to(device)])
    return torch.cat(rows), torch.cat([plan.first_where, plan.rest_where])


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, batch: TrainBatch, temperature: float, micro_batch_size: int,
                   device: torch.device, share_prompts: bool = False) -> torch.Tensor:
    """Log-probs [B, T-1] of a whole batch, micro-batch by micro-batch; 0 off the loss mask."""
    width = batch.loss_mask.shape[1]
    parts = []
    for mb in batch.chunks(max(1, math.ceil(batch.size / micro_batch_size))):
        lp = micro_scores(model, mb, temperature, device, share_prompts).logp.float().cpu() * mb.loss_mask
        parts.append(torch.nn.functional.pad(lp, (0, width - lp.shape[1])))
    return torch.cat(parts)
