"""LoRA on the policy: merged weights under HF names (unit), and a real run whose syncs carry only
the adapted modules yet leave the generators agreeing with the trainer (end to end)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.config import ConfigError, load_config
from tests.conftest import REPO, tiny_overrides

TINY = REPO / "configs" / "grpo_tiny.yaml"


def test_merged_weights_are_base_plus_scaled_low_rank_under_hf_names(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from actors import lora

    cfg = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{"train.lora_rank": 4, "train.lora_alpha": 8}))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    names = {n for n, _ in base.named_parameters()}
    q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = lora.wrap(base, cfg.train)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.manual_seed(0)
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at 0: make the delta non-zero
    merged = lora.merged_weights(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], q + (8 / 4) * b @ a)
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(merged) == len(base.model.layers) * len(per_layer) and set(merged) <= names
    assert set(lora.full_state(model)) == names  # a checkpoint holds the whole model, adapters merged


def test_lora_refuses_half_a_fused_group(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"train.lora_target_modules: \['q_proj'\] without \['k_proj', 'v_proj'\]"):
        load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{"train.lora_rank": 4,
                                                                  "train.lora_target_modules": "[q_proj]"}))


@pytest.mark.slow
def test_a_lora_run_syncs_only_the_adapted_modules_and_the_generator_agrees(ray_cluster, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    import rlhf

    cfg = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{
        "steps": 3, "train.lora_rank": 8, "train.lora_alpha": 16, "train.lr": 1e-2, "weight_sync.verify": True}))
    summary = rlhf.run(cfg)
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    full_gb = sum(p.numel() for p in base.parameters()) * 4 / 1e9
    adapted_gb = sum(p.numel() for n, p in base.named_parameters() if n.endswith("_proj.weight")) * 4 / 1e9
    assert all(r["sync/gb"] == pytest.approx(adapted_gb, rel=1e-6) for r in rows) and adapted_gb < full_gb
    # the generators serve the merged weights: their log-probs are the trainer's, step after step
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
    assert any(abs(r["loss/policy"]) > 0 for r in rows)
    saved = AutoModelForCausalLM.from_pretrained(f"{summary['run_dir'].rsplit('/', 1)[0]}/{cfg.name}/checkpoints/"
                                                 f"step-000003/policy_hf", dtype=torch.float32)
    changed = saved.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    assert changed.abs().max() > 0  # trained through the adapters
    torch.testing.assert_close(saved.model.embed_tokens.weight, base.model.embed_tokens.weight)  # frozen
