"""Runs of one shape share their actors (rlhf.topology.TopologyPool): a run on a kept, reset topology trains
exactly as the same run on a topology built for it, whatever the run before it left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.topology import topology_shape
from tests.conftest import REPO, tiny_overrides

CONFIGS = REPO / "configs"


def _cfg(name: str, overrides: list[str] | None = None):
    return load_config(CONFIGS / name, overrides or [])


def test_the_shape_is_what_the_actors_fix_at_start_up():
    grpo = topology_shape(_cfg("grpo_tiny.yaml"))
    assert grpo is not None
    # other estimators, losses, dynamic sampling, learning rates, sampling settings, async mode: the same actors
    for name in ("rloo_tiny.yaml", "reinforce_pp_tiny.yaml", "gspo_tiny.yaml", "cispo_tiny.yaml", "dapo_tiny.yaml"):
        assert topology_shape(_cfg(name)) == grpo, name
    per_run = ["train.lr=1e-4", "rollout.temperature=0.5", "rollout.mode=async", "train.micro_batch_size=4",
               "rollout.max_new_tokens=16", "seed=7"]
    assert topology_shape(_cfg("grpo_tiny.yaml", per_run)) == grpo
    # what an actor reads only when it starts
    for fixed in ("rollout.num_generators=2", "rollout.kv_cache_gb=2", "train.zero_stage=3", "train.lora_rank=4",
                  "model.dtype=bfloat16", "resources.trainer_cpus=2", "weight_sync.bucket_mb=32"):
        assert topology_shape(_cfg("grpo_tiny.yaml", [fixed])) != grpo, fixed
    # a critic's or a reward model's state is not reset: never kept
    assert topology_shape(_cfg("ppo_tiny.yaml")) is None
    assert topology_shape(_cfg("grpo_tiny.yaml", ["reward.model.path=/some/model"])) is None


def _rows(summary: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_on_a_reset_topology_trains_exactly_as_on_a_fresh_one(topologies, tiny_model, tmp_path):
    """First an async run that ends with requests still in flight and weights moved by a large learning rate;
    then one run on the topology it kept and the same run on a topology of its own: the same samples, the
    same rewards, the same losses."""
    import rlhf

    def cfg(name: str, **extra):
        return load_config(CONFIGS / "grpo_tiny.yaml", tiny_overrides(tiny_model, tmp_path / name, **{
            "name": name, "steps": 3, "checkpoint.save_final": "false", **extra}))

    rlhf.run(cfg("before", **{"rollout.mode": "async", "rollout.max_staleness": 1, "train.lr": 1e-2}),
             topologies=topologies)
    kept = topologies._kept
    assert kept is not None
    generator_id = kept.generators[0]._actor_id
    reused = _rows(rlhf.run(cfg("reused", seed=3), topologies=topologies))
    assert topologies._kept is kept and kept.generators[0]._actor_id == generator_id, "the topology was not kept"
    fresh = _rows(rlhf.run(cfg("fresh", seed=3)))

    assert [r["step"] for r in reused] == [r["step"] for r in fresh] == [1, 2, 3]
    for a, b in zip(reused, fresh, strict=True):
        assert a["reward/mean"] == b["reward/mean"], a["step"]
        assert a["rollout/completion_len"] == b["rollout/completion_len"], a["step"]
        assert a["rollout/policy_version"] == b["rollout/policy_version"] == a["step"] - 1
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
        assert a["train/lr"] == b["train/lr"]
        assert a["sync/logprob_gap"] < 1e-4  # the reset pushed the new run's weights
