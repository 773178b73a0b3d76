"""Checkpoints: everything a run needs to continue as if it had never stopped.

    <checkpoint.dir>/step-000010/
        policy_deepspeed/   the policy's DeepSpeed state (weights, optimizer), every rank's shard
        critic_deepspeed/   the critic's, when the run has one
        policy_hf/          the policy and tokenizer in HF format (plain transformers and vLLM load it)
        state.json          step, policy version, prompt-loader position and RNG state, resolved config

A checkpoint is written into a hidden `.step-N.partial-<pid>` directory and renamed into place when
complete, so a crash mid-write never leaves a `step-N` that looks complete; `resume=auto` only
considers `step-N` directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import ray

from rlhf.config import ConfigError, RunConfig

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(cfg: RunConfig) -> Path:
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir).expanduser().resolve()
    return Path(cfg.logging.output_dir).expanduser().resolve() / cfg.name / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """step-N directories under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resume_path(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(cfg))
        return found[-1] if found else None
    path = Path(resume).expanduser().resolve()
    if not (path / "state.json").is_file():
        raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint (no state.json)")
    return path


def save(topo: Any, cfg: RunConfig, step: int, loader_state: dict, metrics: dict[str, float]) -> Path:
    root = checkpoint_root(cfg)
    final = root / f"step-{step:06d}"
    partial = root / f".step-{step:06d}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    ray.get([r.save_checkpoint.remote(str(partial / "policy_deepspeed")) for r in topo.trainer.ranks])
    if topo.critic is not None:
        ray.get([r.save_checkpoint.remote(str(partial / "critic_deepspeed")) for r in topo.critic.ranks])
    topo.trainer.save_hf(str(partial / "policy_hf"))
    state = {"step": step, "policy_version": step, "loader": loader_state, "config": cfg.to_dict(),
             "metrics": metrics}
    (partial / "state.json").write_text(json.dumps(state))
    if final.exists():  # the same step saved again (a resumed run reaching it): the new one wins
        shutil.rmtree(final)
    os.replace(partial, final)  # atomic: step-N appears complete or not at all
    best = best_checkpoint(root, cfg.checkpoint.keep_best_by) if cfg.checkpoint.keep_best_by else None
    for old in complete_checkpoints(root)[: -cfg.checkpoint.keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    return final


def best_checkpoint(root: Path, metric: str) -> Path | None:
    """The complete checkpoint whose step logged the highest `metric` (None if none logged it)."""
    scored = []
    for path in complete_checkpoints(root):
        value = json.loads((path / "state.json").read_text()).get("metrics", {}).get(metric)
        if value is not None:
            scored.append((value, path))
    return max(scored)[1] if scored else None


def restore(topo: Any, path: Path) -> dict:
    """Load the trainer's (and critic's) DeepSpeed state; returns state.json for the driver."""
    state = json.loads((path / "state.json").read_text())
    ray.get([r.load_checkpoint.remote(str(path / "policy_deepspeed")) for r in topo.trainer.ranks])
    if topo.critic is not None:
        if not (path / "critic_deepspeed").is_dir():
            raise ConfigError(f"checkpoint.resume: {path} has no critic state, but this run trains a critic")
        ray.get([r.load_checkpoint.remote(str(path / "critic_deepspeed")) for r in topo.critic.ranks])
    return state
