"""The rollout stream with stand-in generators (small Ray actors): a hung generator is an error that
names it, within rollout.timeout_s, in both modes; never a hang."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import ray

from rlhf.buffer import BufferClosed, ReplayBuffer
from rlhf.config import load_config
from rlhf.rollouts import RolloutStream
from rlhf.types import Prompt
from tests.conftest import REPO, tiny_overrides


@ray.remote(num_cpus=0)
class HungGenerator:
    async def generate_group(self, prompt, seed):
        import asyncio

        await asyncio.sleep(3600)


class Prompts:
    def __init__(self):
        self.n = 0

    def next_batch(self, n):
        self.n += n
        return [Prompt(index=self.n - n + i, text="p", ids=[1, 2], row={}) for i in range(n)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_hung_generator_fails_the_batch_naming_it(ray_cluster, tiny_model, tmp_path, mode):
    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", tiny_overrides(tiny_model, tmp_path, **{
        "rollout.mode": mode, "rollout.timeout_s": 1}))
    topo = SimpleNamespace(generators=[HungGenerator.remote()], buffer=ReplayBuffer(cfg.buffer_capacity),
                           weight_sync=SimpleNamespace(version=0))
    stream = RolloutStream(topo, Prompts(), scorer=None, cfg=cfg)
    t0 = time.monotonic()
    with pytest.raises((RuntimeError, BufferClosed), match=r"no rollout finished for \d+ s .* on generator-0"):
        stream.next_batch(1, {})
    assert time.monotonic() - t0 < 10
    stream.halt()
    ray.kill(topo.generators[0])
