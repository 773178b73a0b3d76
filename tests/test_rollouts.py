"""The rollout stream: its admission decisions (rlhf/admission.py) and its accounting record on
hand-computed cases (fast); with stand-in generators (small Ray actors, slow), a hung generator is an
error that names it, within rollout.timeout_s, in both modes; never a hang."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import ray

from rlhf.admission import admission_step, keep_groups, min_version
from rlhf.buffer import BufferClosed, ReplayBuffer
from rlhf.config import load_config
from rlhf.rollouts import RolloutStream, StepAccounting
from rlhf.types import Prompt
from tests.conftest import REPO, tiny_overrides


def test_min_version_is_the_trainer_version_less_max_staleness():
    assert min_version(5, max_staleness=0) == 4  # step 5 trains on version 4: on-policy
    assert min_version(5, max_staleness=2) == 2
    assert min_version(1, max_staleness=1) == -1  # the first steps take anything


def admitted(reserved: int, **kw) -> list[int]:
    """The step of every prompt admission lets start now, one slot after another (as _admit does)."""
    steps = []
    while (s := admission_step(reserved=reserved, **kw)) is not None:
        steps.append(s)
        reserved += 1
    return steps


RUN = {"prompts_per_step": 2, "capacity": 8, "steps": 10}


@pytest.mark.parametrize("state, expected", [
    # sync (max_staleness 0): exactly the step's prompts, and only once its weights are served
    ({"next_step": 1, "reserved": 0, "served_version": 0, "max_staleness": 0}, [1, 1]),
    ({"next_step": 2, "reserved": 0, "served_version": 0, "max_staleness": 0}, []),  # step 2 needs version 1
    ({"next_step": 2, "reserved": 0, "served_version": 1, "max_staleness": 0}, [2, 2]),
    # async, max_staleness 1: one step ahead on version 0; slot 4 would land in step 3, which needs version 1
    ({"next_step": 1, "reserved": 0, "served_version": 0, "max_staleness": 1}, [1, 1, 2, 2]),
    # step 2's two groups still held, version 1 served: step 3's prompts start, step 4's (needs 2) do not
    ({"next_step": 2, "reserved": 2, "served_version": 1, "max_staleness": 1}, [3, 3]),
    ({"next_step": 1, "reserved": 0, "served_version": 0, "max_staleness": 2}, [1, 1, 2, 2, 3, 3]),
    # the buffer's capacity and the run's last step bound it as well
    ({"next_step": 1, "reserved": 0, "served_version": 0, "max_staleness": 1, "capacity": 3}, [1, 1, 2]),
    ({"next_step": 1, "reserved": 0, "served_version": 0, "max_staleness": 1, "steps": 1}, [1, 1]),
    ({"next_step": 10, "reserved": 1, "served_version": 9, "max_staleness": 3}, [10]),
    ({"next_step": 1, "reserved": 8, "served_version": 5, "max_staleness": 9}, []),  # full
])
def test_admission_steps(state, expected):
    assert admitted(**{**RUN, **state}) == expected


@pytest.mark.parametrize("signal, filtered, max_filtered, expected", [
    ([True, True, True], 0, 6, [True, True, True]),  # every group has signal (or no dynamic sampling)
    ([False, True, False, False], 0, 2, [False, True, False, True]),  # the 2nd without signal fills the cap
    ([False, False, False], 3, 4, [False, True, True]),  # 3 filtered earlier since the last take
    ([False, False], 0, 0, [True, True]),  # max_sampling_rounds 1: nothing is ever filtered
])
def test_keep_groups_filters_no_signal_groups_until_the_rounds_run_out(signal, filtered, max_filtered, expected):
    assert keep_groups(signal, filtered, max_filtered) == expected


def accounting(**changes) -> StepAccounting:
    fields = {"trained": 8, "filtered": 3, "stale": 1, "filled_without_signal": 2,
              "reward": {"reward/failures/timeout": 2.0, "reward/fn/mean": 0.5}, "buffer_groups": 2,
              "in_flight": 5, "blocked_s": 0.25, "age_s": 0.5, "overlapped": False, "elapsed_s": 3.0,
              "reward_s": 0.75, "wait_s": 0.125, "interval_s": 4.0}
    return StepAccounting(**{**fields, **changes})


def test_step_accounting_metrics_sync():
    a = accounting()
    assert a.metrics() == {
        "data/prompts_taken": 12.0, "data/prompts_trained": 8.0, "data/prompts_filtered": 3.0,
        "data/prompts_dropped": 1.0, "data/filtered/no_signal": 3.0, "data/dropped/stale": 1.0,
        "data/filled_without_signal": 2.0, "reward/failures/timeout": 2.0, "reward/fn/mean": 0.5,
        "buffer/groups": 2.0, "buffer/in_flight": 5.0, "buffer/blocked_s": 0.25, "buffer/age_s": 0.5,
        "timing/generate_s": 2.25, "timing/reward_s": 0.75, "buffer/wait_s": 0.125, "rollout/interval_s": 4.0}
    assert a.generation_s == 2.25  # the driver's 3 s less 0.75 s of scoring


def test_step_accounting_metrics_async_and_run_end():
    a = accounting(overlapped=True).ended(4)  # 4 prompts in flight or ready when the run stopped
    m = a.metrics()
    assert (m["timing/wait_s"], m["rollout/reward_s"]) == (3.0, 0.75)
    assert "timing/generate_s" not in m and "timing/reward_s" not in m
    assert (m["data/prompts_taken"], m["data/prompts_dropped"], m["data/dropped/run_end"]) == (16.0, 5.0, 4.0)
    assert m["data/prompts_taken"] == m["data/prompts_trained"] + m["data/prompts_filtered"] + m[
        "data/prompts_dropped"]
    assert a.generation_s == 4.0  # async: generation ran beside training; its pace is the interval


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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_hung_generator_fails_the_batch_naming_it(ray_cluster, tiny_model, tmp_path, mode):
    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", tiny_overrides(tiny_model, tmp_path, **{
        "rollout.mode": mode, "rollout.timeout_s": 1}))
    topo = SimpleNamespace(generators=[HungGenerator.remote()], buffer=ReplayBuffer(cfg.buffer_capacity),
                           weight_sync=SimpleNamespace(version=0))
    stream = RolloutStream(topo, Prompts(), scorer=None, cfg=cfg)
    t0 = time.monotonic()
    with pytest.raises((RuntimeError, BufferClosed), match=r"no rollout finished for \d+ s .* on generator-0"):
        stream.next_batch(1)
    assert time.monotonic() - t0 < 10
    stream.halt()
    ray.kill(topo.generators[0])
