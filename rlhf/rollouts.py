"""The rollout stream: prompts -> generators -> rewards -> replay buffer, one group at a time.

Each prompt goes to a generator as its own request; a group is scored and put into the buffer the
moment it finishes, so short and long completions do not wait for each other. The trainer takes
`prompts_per_step` groups per step.

    sync mode:  `next_batch(step)` generates the step's prompts on the weights just pushed and
                returns when they are all scored (on-policy).
    async mode: a background thread keeps generating while the trainer trains; a group may come
                from weights up to `rollout.max_staleness` versions older than the trainer's.

Admission (which prompt may start now) is what keeps staleness bounded without waste: a prompt
admitted now lands in step  s = next untaken step + slots already held // prompts_per_step, and
is admitted only if the weights the generators serve (version v) will be at most max_staleness
versions behind the trainer at that step (s - 1 - v <= max_staleness), if s <= cfg.steps, and if
the buffer has a free slot. With max_staleness 0 that is exactly the sync schedule. Groups that
still arrive too old (a slow generator, reordering by the DAPO filter) are dropped when a batch is
taken, and counted.

Accounting: every prompt the loader hands out is resolved in exactly one step as trained, filtered
(DAPO's no-signal filter) or dropped (stale, or still unused when the run ends); `data/prompts_*`.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import ray
import torch

from reward.api import RewardScorer
from rlhf.algorithms import groups_with_signal
from rlhf.buffer import ReplayBuffer
from rlhf.config import RunConfig
from rlhf.data import PromptLoader
from rlhf.shaping import shape_rewards
from rlhf.types import Prompt, SampleGroup


def step_seed(cfg: RunConfig, step: int) -> int:
    """The sampling seed of the prompts trained at `step`; a request's seed is this + prompt.index."""
    return cfg.seed * 1_000_003 + step * 10_007


class RolloutStream:
    def __init__(self, topo: Any, loader: PromptLoader, scorer: RewardScorer, cfg: RunConfig, first_step: int = 1):
        self.topo, self.loader, self.scorer, self.cfg = topo, loader, scorer, cfg
        self.buffer: ReplayBuffer = topo.buffer
        self.batch_groups = cfg.rollout.prompts_per_step
        self.next_step = first_step  # the step whose batch has not been taken yet
        self._inflight: dict[Any, tuple[int, Prompt, int, int]] = {}  # ref -> (generator, prompt, seed, order)
        self._admitted = 0  # prompts admitted so far: each group's order in the batches
        self._lock = threading.RLock()  # admission, collection and the counters below
        self._counts: dict[str, float] = defaultdict(float)  # resolved since the last batch was taken
        self._reward_sums: dict[str, float] = defaultdict(float)
        self._reward_n: dict[str, float] = defaultdict(float)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_take = time.perf_counter()
        self._last_progress = time.monotonic()  # when a group last finished, or the stream last went idle

    # ---- the trainer's side ----
    def next_batch(self, step: int, m: dict[str, float]) -> list[SampleGroup]:
        """The groups to train at `step` (trainer weights: version step - 1), with this step's accounting in m."""
        if step != self.next_step:
            raise RuntimeError(f"batch for step {step} asked, the stream is at step {self.next_step}")
        async_mode = self.cfg.rollout.mode == "async"
        t0 = time.perf_counter()
        if async_mode:
            if self._thread is None:
                self._thread = threading.Thread(target=self._produce, name="rollout-stream", daemon=True)
                self._thread.start()
            self._wake.set()
        min_version = step - 1 - self.cfg.max_staleness
        if not async_mode:
            while self.buffer.count_ready(min_version) < self.batch_groups:
                self._admit()
                if not self._inflight:
                    raise RuntimeError(f"step {step}: no batch ready and nothing admitted to generate "
                                       f"({self.buffer.reserved} slots held of {self.buffer.capacity})")
                self._collect(timeout=1.0)
        waited = self.buffer.wait_s
        self.buffer.wait_ready(self.batch_groups, min_version)
        with self._lock:  # taking and moving on to the next step are one move for admission
            groups, dropped = self.buffer.take(self.batch_groups, min_version)
            self.next_step = step + 1
            reward_s = self._counts.pop("reward_s", 0.0)
            m.update(self._resolve(groups, dropped))
        now = time.perf_counter()
        if async_mode:  # generation and scoring ran beside training; the driver only waited
            m["timing/wait_s"] = now - t0
            m["rollout/reward_s"] = reward_s
        else:
            m["timing/generate_s"] = now - t0 - reward_s
            m["timing/reward_s"] = reward_s
        m["buffer/wait_s"] = self.buffer.wait_s - waited
        m["rollout/interval_s"] = now - self._last_take  # since the previous batch: generation's pace
        self._last_take = now
        self._wake.set()  # slots were freed: the producer may admit more
        return groups

    def stop(self, m: dict[str, float]) -> None:
        """End of the run: stop producing; groups still in flight or ready are dropped (counted in m)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            unused = len(self._inflight) + len(self.buffer)
            self._inflight.clear()
            self.buffer.close()
        for k in ("taken", "dropped"):
            m[f"data/prompts_{k}"] = m.get(f"data/prompts_{k}", 0.0) + unused
        m["data/dropped/run_end"] = float(unused)

    def weights_pushed(self) -> None:
        """A new version is served: admission may let more prompts start."""
        self._wake.set()

    def halt(self) -> None:
        """The run failed: stop producing, without accounting."""
        self._stop.set()
        self._wake.set()

    def loader_state(self) -> dict:
        """The loader's state for a checkpoint, with the unresolved prompts to regenerate on resume."""
        with self._lock:
            return self.loader.state_dict(pending=self.pending_prompts())

    def pending_prompts(self) -> list[Prompt]:
        """Prompts handed out but not yet resolved (in flight or ready): a checkpoint stores them so
        that a resumed run generates them first instead of losing them."""
        with self._lock:
            return [p for _, p, _, _ in self._inflight.values()] + self.buffer.ready_prompts()

    # ---- the producer's side (the driver's thread in sync mode, a background thread in async) ----
    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                self._admit()
                if self._inflight:
                    self._collect(timeout=0.05)
                else:
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
        except BaseException as e:  # the trainer's take must not wait for a producer that is gone
            self.buffer.close(e)

    def _target_step(self) -> int:
        return self.next_step + self.buffer.reserved // self.batch_groups

    def _may_admit(self) -> bool:
        s = self._target_step()
        staleness = s - 1 - self.topo.weight_sync.version
        return (not self._stop.is_set() and self.buffer.reserved < self.buffer.capacity and s <= self.cfg.steps
                and staleness <= self.cfg.max_staleness)

    def _admit(self) -> None:
        """Send every prompt admission allows, each to the generator with the fewest requests in flight."""
        with self._lock:
            while self._may_admit():
                seed = step_seed(self.cfg, self._target_step())
                if not self.buffer.reserve(timeout=0):
                    return
                prompt = self.loader.next_batch(1)[0]
                self._submit(prompt, seed, self._least_loaded(), self._admitted)
                self._admitted += 1

    def _least_loaded(self) -> int:
        load = [0] * len(self.topo.generators)
        for i, *_ in self._inflight.values():
            load[i] += 1
        return load.index(min(load))

    def _submit(self, prompt: Prompt, seed: int, i: int, order: int) -> None:
        if not self._inflight:
            self._last_progress = time.monotonic()
        self._inflight[self.topo.generators[i].generate_group.remote(prompt, seed)] = (i, prompt, seed, order)

    def _collect(self, timeout: float) -> None:
        """Score and buffer every finished group (waiting up to `timeout` for the first)."""
        refs = list(self._inflight)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            self._check_progress()
            return
        self._last_progress = time.monotonic()
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        groups: list[tuple[SampleGroup, int]] = []
        with self._lock:
            for ref in ready:
                if ref not in self._inflight:  # resubmitted after its generator died, below
                    continue
                try:
                    groups.append((ray.get(ref), self._inflight[ref][3]))
                    del self._inflight[ref]
                except ray.exceptions.RayActorError:
                    self._replace_generator(self._inflight[ref][0])
        if groups:
            self._score(groups)

    def _check_progress(self) -> None:
        """A hung generator must not hang the run: nothing finishing for rollout.timeout_s is an error."""
        waited = time.monotonic() - self._last_progress
        if waited > self.cfg.rollout.timeout_s:
            busy = sorted({i for i, *_ in self._inflight.values()})
            raise RuntimeError(f"no rollout finished for {waited:.0f} s (rollout.timeout_s="
                               f"{self.cfg.rollout.timeout_s:g}) with {len(self._inflight)} request(s) in flight on "
                               f"{', '.join(f'generator-{i}' for i in busy)}: hung or far too slow")

    def _replace_generator(self, i: int) -> None:
        """Generator i died: a new one takes its place and its unfinished prompts, with the same seeds."""
        self.topo.restart_generator(i)
        lost = [(ref, p, seed, order) for ref, (g, p, seed, order) in self._inflight.items() if g == i]
        for ref, prompt, seed, order in lost:
            del self._inflight[ref]
            self._submit(prompt, seed, i, order)

    def _score(self, ordered: list[tuple[SampleGroup, int]]) -> None:
        a = self.cfg.algorithm
        t0 = time.perf_counter()
        groups = [g for g, _ in ordered]
        samples = [s for g in groups for s in g.samples]
        metrics = self.scorer.score(groups)
        metrics.update(shape_rewards(samples, a, self.cfg.rollout.max_new_tokens))
        seconds = time.perf_counter() - t0
        keep = [True] * len(groups)
        if a.dynamic_sampling:
            rewards = torch.tensor([s.reward for s in samples])
            keep = groups_with_signal(rewards, self.cfg.rollout.samples_per_prompt).tolist()
        with self._lock:
            self._counts["reward_s"] += seconds
            for key, value in metrics.items():
                if key.endswith("failures") or "/failures/" in key:
                    self._counts[key] += value
                else:
                    self._reward_sums[key] += value * len(samples)
                    self._reward_n[key] += len(samples)
            # DAPO's dynamic sampling: a group with no spread in its rewards gives a group baseline no
            # signal and is filtered, and more prompts are admitted in its place; after
            # (max_sampling_rounds - 1) batches' worth filtered in one step, such groups are trained anyway.
            for (g, order), signal in zip(ordered, keep):
                if signal or self._counts["filtered"] >= (a.max_sampling_rounds - 1) * self.batch_groups:
                    self._counts["filled_without_signal"] += not signal
                    self.buffer.put(g, order)
                else:  # no spread in the group's rewards: no signal for a group baseline
                    self._counts["filtered"] += 1
                    self.buffer.release()

    def _resolve(self, groups: list[SampleGroup], dropped: list[SampleGroup]) -> dict[str, float]:
        """This step's accounting and reward metrics; resets the counters for the next step."""
        c = self._counts
        trained, filtered, stale = len(groups), c.pop("filtered", 0.0), float(len(dropped))
        m = {"data/prompts_taken": trained + filtered + stale, "data/prompts_trained": float(trained),
             "data/prompts_filtered": filtered, "data/prompts_dropped": stale, "data/filtered/no_signal": filtered,
             "data/dropped/stale": stale, "data/filled_without_signal": c.pop("filled_without_signal", 0.0)}
        m.update(c)  # failure counts
        m.update({k: self._reward_sums[k] / self._reward_n[k] for k in self._reward_sums if self._reward_n[k]})
        c.clear()
        self._reward_sums.clear()
        self._reward_n.clear()
        m["buffer/groups"] = float(len(self.buffer))
        m["buffer/in_flight"] = float(len(self._inflight))
        m["buffer/blocked_s"] = self.buffer.blocked_s
        m["buffer/age_s"] = self.buffer.last_age_s
        return m
