"""The weight-sync service on the real stack: two vLLM engines, a DeepSpeed trainer, a gloo group."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from tests.test_e2e import _generate_batch, _loader
from weight_sync.service import GeneratorLost, WeightSyncError

pytestmark = pytest.mark.slow


def test_a_corrupted_tensor_is_detected_and_named(stack):
    cfg, topo = stack
    assert cfg.weight_sync.verify
    name = "model.layers.1.mlp.up_proj.weight"
    ray.get(topo.generators[1].corrupt_next_receive.remote(name))
    with pytest.raises(WeightSyncError, match=rf"generator-1 worker 0 received tensors .*checksum mismatch\): {name}$"):
        topo.weight_sync.push(topo.weight_sync.version + 1)
    topo.weight_sync.push(topo.weight_sync.version + 1)  # the next push repairs it


def test_a_dead_or_hung_generator_fails_the_push_within_the_timeout_naming_it(stack):
    """On the shared stack, with pushes bounded by 10 s: generator-1 killed, the push fails naming it; a
    replacement joins a new group and gets the version. Then generator-0 frozen (SIGSTOP): the push fails
    within the timeout naming it as dead or hung; thawed, it rejoins and both serve the next version."""
    import dataclasses
    import os
    import signal

    from ray._private.state import actors

    cfg, topo = stack
    service, v = topo.weight_sync, topo.weight_sync.version
    kept, service.cfg = service.cfg, dataclasses.replace(service.cfg, timeout_s=10.0)
    try:
        ray.kill(topo.generators[1])
        t0 = time.monotonic()
        with pytest.raises(GeneratorLost, match=rf"push of version {v + 1}: generator-1 died"):
            service.push(v + 1)
        assert time.monotonic() - t0 < service.cfg.timeout_s + 5
        topo.restart_generator(1, push=False)
        service.push(v + 1)

        pid = actors(actor_id=topo.generators[0]._actor_id.hex())["Pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            hung = rf"push of version {v + 2}: no answer within 10 s from generator-0"
            with pytest.raises(WeightSyncError, match=hung):
                service.push(v + 2)
            assert time.monotonic() - t0 < service.cfg.timeout_s + 5
        finally:
            os.kill(pid, signal.SIGCONT)
        service.reconnect()
        service.push(v + 3)
        assert [ray.get(g.serving_version.remote()) for g in topo.generators] == [v + 3, v + 3]
    finally:
        service.cfg = kept


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
