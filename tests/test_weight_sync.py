"""The weight-sync service on the real stack: two vLLM engines, a DeepSpeed trainer, a gloo group."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from rlhf.config import load_config
from rlhf.topology import build_topology, teardown
from rollout.generator import generate_groups as generate
from tests.conftest import REPO, tiny_overrides
from tests.test_e2e import _gap, _generate_batch, _loader, _train_once
from weight_sync.service import GeneratorLost, WeightSyncError

pytestmark = pytest.mark.slow


def _greedy(generators, prompts) -> list[list[int]]:
    return [g.samples[0].completion_ids for g in generate(generators, prompts, seed=0, greedy=True)]


def test_after_a_push_every_generator_matches_a_fresh_engine_on_the_same_weights(stack, tmp_path):
    from rollout.generator import Generator, generator_env

    cfg, topo = stack
    tok, loader = _loader(cfg)
    prompts = loader.next_batch(6)
    before = {i: _greedy([g], prompts) for i, g in enumerate(topo.generators)}

    batch, samples = _generate_batch(cfg, topo, loader, tok, seed=11)
    _, old = _gap(topo, batch)
    _train_once(cfg, topo, batch, samples, old, step=11)
    topo.weight_sync.push(topo.weight_sync.version + 1)
    after = {i: _greedy([g], prompts) for i, g in enumerate(topo.generators)}

    saved = tmp_path / "policy"
    topo.trainer.save_hf(str(saved))
    fresh_cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", tiny_overrides(saved, tmp_path))
    fresh = Generator.options(num_cpus=0, runtime_env={"env_vars": generator_env(fresh_cfg, "cpu")}).remote(
        9, fresh_cfg, "cpu")
    try:
        reference = _greedy([fresh], prompts)
    finally:
        ray.kill(fresh)

    assert after[0] == reference and after[1] == reference
    assert after[0] != before[0], "one training step changed no greedy output: the test could not see a no-op sync"

    # The saved policy, in plain transformers, gives the trainer's log-probs of sampled tokens.
    from transformers import AutoModelForCausalLM

    from actors.common import batch_logprobs

    plain = AutoModelForCausalLM.from_pretrained(saved).eval()
    batch, _ = _generate_batch(cfg, topo, loader, tok, seed=13)
    trainer_lp = topo.trainer.compute_logprobs(batch)
    plain_lp = batch_logprobs(plain, batch, cfg.rollout.temperature, 8, torch.device("cpu"))
    assert (trainer_lp - plain_lp).abs().max().item() < 1e-4


def test_a_corrupted_tensor_is_detected_and_named(stack):
    cfg, topo = stack
    assert cfg.weight_sync.verify
    name = "model.layers.1.mlp.up_proj.weight"
    ray.get(topo.generators[1].corrupt_next_receive.remote(name))
    with pytest.raises(WeightSyncError, match=rf"generator-1 worker 0 received tensors .*checksum mismatch\): {name}$"):
        topo.weight_sync.push(topo.weight_sync.version + 1)
    topo.weight_sync.push(topo.weight_sync.version + 1)  # the next push repairs it


def test_a_dead_or_hung_generator_fails_the_push_within_the_timeout_naming_it(ray_cluster, tiny_model, tmp_path):
    """generator-1 killed: the push fails naming it; a replacement joins a new group and gets version 2.
    Then generator-0 frozen (SIGSTOP): the push fails within the timeout naming it as dead or hung;
    thawed, it rejoins and serves version 4."""
    import os
    import signal

    from ray._private.state import actors

    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", tiny_overrides(tiny_model, tmp_path, **{
        "rollout.num_generators": 2, "weight_sync.timeout_s": 10}))
    topo = build_topology(cfg, "cpu", run_id="kill-test")
    try:
        topo.weight_sync.push(1)
        ray.kill(topo.generators[1])
        t0 = time.monotonic()
        with pytest.raises(GeneratorLost, match=r"push of version 2: generator-1 died"):
            topo.weight_sync.push(2)
        assert time.monotonic() - t0 < cfg.weight_sync.timeout_s + 5
        topo.restart_generator(1, push=False)
        topo.weight_sync.push(2)

        pid = actors(actor_id=topo.generators[0]._actor_id.hex())["Pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(WeightSyncError, match=r"push of version 3: no answer within 10 s from generator-0"):
                topo.weight_sync.push(3)
            assert time.monotonic() - t0 < cfg.weight_sync.timeout_s + 5
        finally:
            os.kill(pid, signal.SIGCONT)
        topo.weight_sync.reconnect()
        topo.weight_sync.push(4)
        assert [ray.get(g.serving_version.remote()) for g in topo.generators] == [4, 4]
    finally:
        teardown(topo, graceful=False)  # trainer rank 0 may still sit in the broadcast; no close() handshake


def test_checksums_agree_across_engines_and_versions_advance(stack):
    cfg, topo = stack
    v = topo.weight_sync.version
    metrics = topo.weight_sync.push(v + 1)
    assert metrics["sync/gb"] == pytest.approx(sum(p.numel() for p in _param_shapes(cfg)) * 4 / 1e9, rel=1e-6)
    tok, loader = _loader(cfg)
    _, samples = _generate_batch(cfg, topo, loader, tok, seed=12)
    assert {s.policy_version for s in samples} == {v + 1} and {s.generator for s in samples} == {0, 1}


def _param_shapes(cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path))
    return list(model.parameters())
