"""LoRA for the policy (peft): low-rank adapters on the target modules, the base weights frozen.

The generators never see adapters: each weight sync carries, for every adapted module, the merged
weight W + (lora_alpha / r) * B @ A under the base model's HF name, and nothing else (embeddings,
norms and untargeted modules do not change, so they are not sent). Checkpoints hold the full merged
model, loadable by transformers and vLLM like any other. The config refuses targets that would split
one of vLLM's fused modules (rlhf.config.FUSED_GROUPS).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.config import TrainConfig


def wrap(model: torch.nn.Module, t: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                        target_modules=list(t.lora_target_modules), bias="none")
    return get_peft_model(model, config)


def base_name(name: str) -> str:
    """The base model's HF name of a peft module or parameter name."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def merged_weights(model: Any) -> dict[str, torch.Tensor]:
    """HF weight name -> W + scale * B @ A, for every adapted module, computed now (a copy)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                out[f"{base_name(name)}.weight"] = (w + delta.to(w.dtype)).detach()
    return out


def full_state(model: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights under HF names, the adapted ones merged: what a checkpoint saves."""
    state = {base_name(n): p.detach() for n, p in model.named_parameters() if "lora_" not in n}
    state.update(merged_weights(model))
    return state
