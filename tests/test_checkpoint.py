"""Checkpoints and exact resume, on the real stack."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhf.checkpoint import complete_checkpoints, resume_path
from rlhf.config import load_config
from tests.conftest import REPO, tiny_overrides

TINY = REPO / "configs" / "grpo_tiny.yaml"


def _rows(summary) -> list[dict]:
    return [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_only_complete_checkpoints_are_resumed_from(tmp_path):
    root = tmp_path / "ckpt"
    for name in ("step-000002", "step-000010", ".step-000012.partial-99", "step-000004"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in complete_checkpoints(root)] == ["step-000002", "step-000004", "step-000010"]
    cfg = load_config(TINY, [f"checkpoint.dir={root}", "checkpoint.resume=auto"])
    assert resume_path(cfg).name == "step-000010"  # the partial step 12 is ignored
    assert resume_path(load_config(TINY, [f"checkpoint.dir={tmp_path / 'none'}", "checkpoint.resume=auto"])) is None
    with pytest.raises(Exception, match="is not a complete checkpoint"):
        resume_path(load_config(TINY, [f"checkpoint.resume={root / 'step-000002'}"]))


@pytest.mark.slow
def test_a_resumed_run_continues_as_if_it_had_never_stopped(topologies, tiny_model, tmp_path):
    """4 steps straight vs 2 steps, stop, resume to 4: steps 3-4 give the same rewards (sampling is
    seeded per request, so the same weights give the same samples) and losses within 1e-5."""
    import rlhf

    def cfg(name: str, **extra):
        return load_config(TINY, tiny_overrides(tiny_model, tmp_path / name, **{
            "steps": 4, "checkpoint.every": 2, "checkpoint.keep": 1, **extra}))

    straight = _rows(rlhf.run(cfg("straight"), topologies=topologies))
    first_half = rlhf.run(cfg("resumed", steps=2), topologies=topologies)
    root = Path(first_half["run_dir"]).parent / "grpo_tiny" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-000002"]
    resumed = _rows(rlhf.run(cfg("resumed", **{"checkpoint.resume": "auto"}), topologies=topologies))

    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
        assert a["rollout/policy_version"] == b["rollout/policy_version"]
    assert [p.name for p in complete_checkpoints(root)] == ["step-000004"]  # keep=1 pruned step 2
    ckpt = complete_checkpoints(root)[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["loader"]["position"] == 4 * 8
    assert (ckpt / "policy_hf" / "config.json").exists() and not any(p.name.startswith(".") for p in root.iterdir())
    assert os.listdir(ckpt / "policy_deepspeed")


@pytest.mark.slow
def test_evaluation_is_logged_and_the_best_checkpoint_is_kept(topologies, tiny_model, tmp_path):
    import rlhf

    cfg = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{
        "steps": 4, "eval.every": 2, "eval.num_prompts": 6, "checkpoint.every": 1, "checkpoint.keep": 1,
        "checkpoint.keep_best_by": "eval/reward/mean"}))
    summary = rlhf.run(cfg, topologies=topologies)
    rows = _rows(summary)
    evaluated = [r["step"] for r in rows if "eval/reward/mean" in r]
    assert evaluated == [2, 4]
    # the untrained policy is evaluated too (what the run's evals compare with), and the last eval is summed up
    assert 0 <= summary["eval_start"]["eval/reward/mean"] <= 1 and summary["eval_start"]["eval/completion_len"] > 0
    assert summary["eval_end"] == {k: v for k, v in rows[-1].items() if k.startswith("eval/")}
    for r in rows:
        if "eval/reward/mean" in r:
            assert 0 <= r["eval/reward/mean"] <= 1 and r["eval/charset_reward/mean"] == r["eval/reward/mean"]
            assert r["timing/eval_s"] > 0
    best_step = max((r["eval/reward/mean"], r["step"]) for r in rows if "eval/reward/mean" in r)[1]
    kept = {p.name for p in complete_checkpoints(tmp_path / "grpo_tiny" / "checkpoints")}
    assert kept == {"step-000004", f"step-{best_step:06d}"}


@pytest.mark.slow
def test_a_checkpoint_reproduces_the_trainer_in_transformers_and_vllm_and_pushed_generators_match_it(stack, tmp_path):
    """After a training step and its push, the real checkpoint writer saves the stack's trainer; a fresh vLLM
    engine and plain transformers, both loading policy_hf from disk, give the trainer's log-probs, and each
    of the stack's two generators, which got the step's weights by the push, decodes greedily exactly as
    the fresh engine does."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.common import batch_logprobs
    from rlhf import checkpoint
    from rlhf.algorithms import masked_mean
    from rlhf.types import collate
    from rollout.generator import Generator, generator_env
    from tests.test_e2e import LOGPROB_GAP_TOL, _gap, _generate_batch, _loader, _train_once

    cfg, topo = stack
    tok, loader = _loader(cfg)
    greedy_prompts = loader.next_batch(6)
    before = [_greedy([g], greedy_prompts) for g in topo.generators]
    batch, samples = _generate_batch(cfg, topo, loader, tok, seed=11)
    _, old = _gap(topo, batch)
    _train_once(cfg, topo, batch, samples, old, step=1)  # weights no longer those of the model on disk
    topo.weight_sync.push(topo.weight_sync.version + 1)
    after = [_greedy([g], greedy_prompts) for g in topo.generators]
    cfg_ckpt = load_config(TINY, tiny_overrides(cfg.model.path, tmp_path, **{"checkpoint.dir": tmp_path / "ckpt"}))
    hf_dir = checkpoint.save(topo, cfg_ckpt, 7, loader.state_dict(), {}) / "policy_hf"

    fresh_cfg = load_config(TINY, tiny_overrides(hf_dir, tmp_path))
    fresh = Generator.options(num_cpus=0, runtime_env={"env_vars": generator_env(fresh_cfg, "cpu")}).remote(
        0, fresh_cfg, "cpu")
    try:
        groups = ray.get(fresh.generate.remote(loader.next_batch(cfg.rollout.prompts_per_step), 12))
        reference = _greedy([fresh], greedy_prompts)
    finally:
        ray.kill(fresh)
    assert len(after) == 2 and all(a == reference for a in after)  # the push brought the checkpoint's weights
    assert after[0] != before[0], "one training step changed no greedy output: the test could not see a no-op push"
    batch = collate([s for g in groups for s in g.samples], tok.pad_token_id)
    trainer_lp = topo.trainer.compute_logprobs(batch)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_lp = batch_logprobs(model, batch, cfg.rollout.temperature, 16, torch.device("cpu"))
    mask = batch.loss_mask
    assert masked_mean((trainer_lp - batch.rollout_logprobs).abs(), mask).item() < LOGPROB_GAP_TOL  # vLLM
    assert (trainer_lp - hf_lp).abs().max().item() < 1e-5  # transformers
    # ...and the checkpoint holds the trained weights, not the model the run started from.
    start = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    start_lp = batch_logprobs(start, batch, cfg.rollout.temperature, 16, torch.device("cpu"))
    assert masked_mean((start_lp - hf_lp).abs(), mask).item() > 100 * LOGPROB_GAP_TOL


def _greedy(generators, prompts) -> list[list[int]]:
    from rollout.generator import generate_groups

    return [g.samples[0].completion_ids for g in generate_groups(generators, prompts, seed=0, greedy=True)]
