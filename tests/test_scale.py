"""Scale-out on this machine: a simulated two-node cluster, a tensor-parallel generator, ZeRO-3 with
offload and activation checkpointing, and the plan's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf.config import load_config
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow
TINY = REPO / "configs" / "grpo_tiny.yaml"


def test_roles_land_on_the_nodes_the_config_names_and_a_run_completes_across_two_nodes(tiny_model, tmp_path):
    env = dict(os.environ, RAY_ADDRESS="", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "two_node_run.py"), str(tiny_model), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["nodes"] == 2
    assert result["placed"] == {"generator-0": ["rollout"], "trainer-rank-0": ["train"]}
    assert result["summary"]["steps"] == 3


def test_a_tp2_generator_serves_the_trainers_weights_after_a_push(ray_cluster, tiny_model, tmp_path):
    """Both TP workers join the weight-sync group: after a training step's push, the log-probs the TP=2
    engine gives its samples equal the trainer's to fp32 noise. A worker left on the old shard would
    compute half of every layer with stale weights (the gap after one skipped sync is ~1e-2 here,
    tests/test_e2e.py), and one that missed the push would stamp the wrong version."""
    import ray

    from rlhf.topology import build_topology, teardown
    from tests.test_e2e import LOGPROB_GAP_TOL, _gap, _generate_batch, _loader, _train_once

    cfg = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{
        "rollout.tensor_parallel_size": 2, "resources.generator_cpus": 2}))
    topo = build_topology(cfg, "cpu", run_id="tp2")
    try:
        assert ray.get(topo.generators[0].num_workers.remote()) == 2
        tok, loader = _loader(cfg)
        batch, samples = _generate_batch(cfg, topo, loader, tok, seed=5)
        gap_before, old = _gap(topo, batch)
        _train_once(cfg, topo, batch, samples, old, step=1)
        topo.weight_sync.push(1)
        batch, samples = _generate_batch(cfg, topo, loader, tok, seed=6)
        gap_after, _ = _gap(topo, batch)
    finally:
        teardown(topo)
    assert gap_before < LOGPROB_GAP_TOL and gap_after < LOGPROB_GAP_TOL, (gap_before, gap_after)
    assert all(s.policy_version == 1 for s in samples)


def test_dry_run_prints_the_plan_and_refuses_what_cannot_fit(ray_cluster, tiny_model, tmp_path, capsys):
    """The CLI's --dry-run, a driver of its own on the tests' cluster (as a user's on a running head); the
    refusal on that cluster, in this process."""
    from rlhf.train import print_plan

    cli = [sys.executable, "-m", "rlhf.train", "--config", str(TINY), "--dry-run",
           *tiny_overrides(tiny_model, tmp_path)]
    address = ray_cluster.get_runtime_context().gcs_address
    # A deadline against a hang only: the imports and the connection take ~10 s here.
    ok = subprocess.run(cli, capture_output=True, text=True, env=dict(os.environ, RAY_ADDRESS=address), cwd=REPO,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "generator-0" in ok.stdout and "trainer-rank-0" in ok.stdout and "total host memory" in ok.stdout
    small = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{"resources.node_memory_gb": 2}))
    assert print_plan(small, [n for n in ray_cluster.nodes() if n.get("Alive", True)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "short by" in err and "generator-0" in err


def test_a_colocated_run_on_cpu_moves_weights_through_shared_memory(ray_cluster, tiny_model, tmp_path):
    """resources.colocate: generator 0 shares trainer rank 0's bundle and weights go by the ipc backend
    (shared memory on CPU; CUDA IPC on GPU), checksummed after every push."""
    import rlhf

    cfg = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{
        "steps": 3, "resources.colocate": True, "weight_sync.verify": True, "checkpoint.save_final": "false"}))
    summary = rlhf.run(cfg)
    assert summary["weight_sync_backend"] == "ipc"
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert [r["rollout/policy_version"] for r in rows] == [0, 1, 2]
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
