"""The rollout stream: prompts -> generators -> rewards -> replay buffer, one group at a time.

Each prompt goes to a generator as its own request; a group is scored and put into the buffer the
moment it finishes, so short and long completions do not wait for each other. The trainer takes
`prompts_per_step` groups per step.

    sync mode:  `next_batch(step)` generates the step's prompts on the weights just pushed and
                returns when they are all scored (on-policy).
    async mode: a background thread keeps generating while the trainer trains; a group may come
                from weights up to `rollout.max_staleness` versions older than the trainer's.

Which prompt may start, which group is filtered and which is too old to train are pure functions in
`rlhf/admission.py`; this module holds the state they decide on and the threads that act on it.

Accounting: every prompt the loader hands out is resolved in exactly one step as trained, filtered
(DAPO's no-signal filter) or dropped (stale, or still unused when the run ends); each batch comes
with a `StepAccounting`, whose `metrics()` are the run's `data/prompts_*`, `buffer/*` and timings.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import torch

from reward.api import RewardScorer
from rlhf.admission import admission_step, keep_groups, min_version
from rlhf.algorithms import groups_with_signal
from rlhf.buffer import ReplayBuffer
from rlhf.config import RunConfig
from rlhf.data import PromptLoader
from rlhf.shaping import shape_rewards
from rlhf.types import Prompt, SampleGroup


def step_seed(cfg: RunConfig, step: int) -> int:
    """The sampling seed of the prompts trained at `step`; a request's seed is this + prompt.index."""
    return cfg.seed * 1_000_003 + step * 10_007


@dataclass(frozen=True)
class StepAccounting:
    """What the stream did for one batch: where every prompt resolved since the previous batch went,
    the reward stage's metrics over those prompts, the buffer after the take, and the time spent.
    `metrics()` names each as the run logs it."""

    trained: int  # groups in the batch
    filtered: int  # groups DAPO's filter removed for lack of signal
    stale: int  # ready groups dropped at the take: older than min_version(step)
    filled_without_signal: int  # groups without signal trained anyway: the filter's rounds ran out
    reward: dict[str, float]  # the reward stage's metrics: failure counts summed, means weighted by samples
    buffer_groups: int  # groups ready in the buffer after the take
    in_flight: int  # requests at the generators after the take
    blocked_s: float  # producers held back by a full buffer, summed over the run
    age_s: float  # mean seconds the batch's groups sat ready before the take
    overlapped: bool  # async mode: generation and scoring ran beside training, the driver only waited
    elapsed_s: float  # the driver's seconds in next_batch (sync: generating and scoring; async: waiting)
    reward_s: float  # seconds scoring the groups resolved since the previous batch
    wait_s: float  # seconds the driver waited on the buffer for the batch
    interval_s: float  # seconds since the previous batch was taken: generation's pace
    run_end: int | None = None  # prompts in flight or ready when the run stopped; None before the last step

    @property
    def dropped(self) -> int:
        return self.stale + (self.run_end or 0)

    @property
    def taken(self) -> int:
        """Every prompt resolved in this step: trained + filtered + dropped."""
        return self.trained + self.filtered + self.dropped

    @property
    def generation_s(self) -> float:
        """Seconds of generation behind the batch: sync, the driver's wait less scoring; async, the
        interval between batches (generation ran beside training)."""
        return self.interval_s if self.overlapped else self.elapsed_s - self.reward_s

    def ended(self, unused: int) -> StepAccounting:
        """The last step's accounting with the prompts the run's end left unused counted as dropped."""
        return replace(self, run_end=unused)

    def metrics(self) -> dict[str, float]:
        m = {"data/prompts_taken": float(self.taken), "data/prompts_trained": float(self.trained),
             "data/prompts_filtered": float(self.filtered), "data/prompts_dropped": float(self.dropped),
             "data/filtered/no_signal": float(self.filtered), "data/dropped/stale": float(self.stale),
             "data/filled_without_signal": float(self.filled_without_signal)}
        m.update(self.reward)
        m.update({"buffer/groups": float(self.buffer_groups), "buffer/in_flight": float(self.in_flight),
                  "buffer/blocked_s": self.blocked_s, "buffer/age_s": self.age_s})
        if self.overlapped:
            m["timing/wait_s"] = self.elapsed_s
            m["rollout/reward_s"] = self.reward_s
        else:
            m["timing/generate_s"] = self.elapsed_s - self.reward_s
            m["timing/reward_s"] = self.reward_s
        m["buffer/wait_s"] = self.wait_s
        m["rollout/interval_s"] = self.interval_s
        if self.run_end is not None:
            m["data/dropped/run_end"] = float(self.run_end)
        return m


@dataclass
class _Tally:
    """What was resolved since the last batch was taken (changed under the stream's lock)."""

    filtered: int = 0
    filled_without_signal: int = 0
    reward_s: float = 0.0
    failures: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    reward_sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # metric x samples
    reward_n: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # samples per metric

    def reward(self) -> dict[str, float]:
        means = {k: self.reward_sums[k] / self.reward_n[k] for k in self.reward_sums if self.reward_n[k]}
        return {**self.failures, **means}


class RolloutStream:
    def __init__(self, topo: Any, loader: PromptLoader, scorer: RewardScorer, cfg: RunConfig, first_step: int = 1):
        self.topo, self.loader, self.scorer, self.cfg = topo, loader, scorer, cfg
        self.buffer: ReplayBuffer = topo.buffer
        self.batch_groups = cfg.rollout.prompts_per_step
        self.next_step = first_step  # the step whose batch has not been taken yet
        self._inflight: dict[Any, tuple[int, Prompt, int, int]] = {}  # ref -> (generator, prompt, seed, order)
        self._admitted = 0  # prompts admitted so far: each group's order in the batches
        self._lock = threading.RLock()  # admission, collection and the tally
        self._tally = _Tally()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_take = time.perf_counter()
        self._last_progress = time.monotonic()  # when a group last finished, or the stream last went idle

    # ---- the trainer's side ----
    def next_batch(self, step: int) -> tuple[list[SampleGroup], StepAccounting]:
        """The groups to train at `step` (trainer weights: version step - 1), and this step's accounting."""
        if step != self.next_step:
            raise RuntimeError(f"batch for step {step} asked, the stream is at step {self.next_step}")
        async_mode = self.cfg.rollout.mode == "async"
        t0 = time.perf_counter()
        if async_mode:
            if self._thread is None:
                self._thread = threading.Thread(target=self._produce, name="rollout-stream", daemon=True)
                self._thread.start()
            self._wake.set()
        oldest = min_version(step, self.cfg.max_staleness)
        if not async_mode:
            while self.buffer.count_ready(oldest) < self.batch_groups:
                self._admit()
                if not self._inflight:
                    raise RuntimeError(f"step {step}: no batch ready and nothing admitted to generate "
                                       f"({self.buffer.reserved} slots held of {self.buffer.capacity})")
                self._collect(timeout=1.0)
        waited = self.buffer.wait_s
        self.buffer.wait_ready(self.batch_groups, oldest)
        with self._lock:  # taking and moving on to the next step are one move for admission
            groups, dropped = self.buffer.take(self.batch_groups, oldest)
            self.next_step = step + 1
            tally, self._tally = self._tally, _Tally()
            in_buffer, in_flight = len(self.buffer), len(self._inflight)
            blocked_s, age_s = self.buffer.blocked_s, self.buffer.last_age_s
        now = time.perf_counter()
        accounting = StepAccounting(
            trained=len(groups), filtered=tally.filtered, stale=len(dropped),
            filled_without_signal=tally.filled_without_signal, reward=tally.reward(), buffer_groups=in_buffer,
            in_flight=in_flight, blocked_s=blocked_s, age_s=age_s, overlapped=async_mode, elapsed_s=now - t0,
            reward_s=tally.reward_s, wait_s=self.buffer.wait_s - waited, interval_s=now - self._last_take)
        self._last_take = now
        self._wake.set()  # slots were freed: the producer may admit more
        return groups, accounting

    def stop(self) -> int:
        """End of the run: stop producing. Returns how many prompts were still in flight or ready:
        they are dropped (see StepAccounting.ended)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            unused = len(self._inflight) + len(self.buffer)
            self._inflight.clear()
            self.buffer.close()
        return unused

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

    def _admission_step(self) -> int | None:
        """The step a prompt admitted now would be trained at, or None (rlhf/admission.py)."""
        if self._stop.is_set():
            return None
        return admission_step(next_step=self.next_step, reserved=self.buffer.reserved,
                              prompts_per_step=self.batch_groups, capacity=self.buffer.capacity,
                              served_version=self.topo.weight_sync.version, max_staleness=self.cfg.max_staleness,
                              steps=self.cfg.steps)

    def _admit(self) -> None:
        """Send every prompt admission allows, each to the generator with the fewest requests in flight."""
        with self._lock:
            while (step := self._admission_step()) is not None:
                if not self.buffer.reserve(timeout=0):
                    return
                prompt = self.loader.next_batch(1)[0]
                self._submit(prompt, step_seed(self.cfg, step), self._least_loaded(), self._admitted)
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
        signal = [True] * len(groups)
        if a.dynamic_sampling:
            rewards = torch.tensor([s.reward for s in samples])
            signal = groups_with_signal(rewards, self.cfg.rollout.samples_per_prompt).tolist()
        with self._lock:
            tally = self._tally
            tally.reward_s += seconds
            for key, value in metrics.items():
                if key.endswith("failures") or "/failures/" in key:
                    tally.failures[key] += value
                else:
                    tally.reward_sums[key] += value * len(samples)
                    tally.reward_n[key] += len(samples)
            # DAPO's dynamic sampling (rlhf/admission.py): a group without signal is filtered, and
            # admission sends another prompt for its freed slot
            keep = keep_groups(signal, tally.filtered, (a.max_sampling_rounds - 1) * self.batch_groups)
            for (g, order), has_signal, kept in zip(ordered, signal, keep):
                if kept:
                    tally.filled_without_signal += not has_signal
                    self.buffer.put(g, order)
                else:  # no spread in the group's rewards: no signal for a group baseline
                    tally.filtered += 1
                    self.buffer.release()
