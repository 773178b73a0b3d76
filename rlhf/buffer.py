"""The replay buffer: scored sample groups between the generators and the trainer.

Capacity is counted in slots, and a slot is held from the moment a prompt is sent to a generator
until its group leaves (taken for training, filtered or dropped). So a full buffer stops new
generation (backpressure on the generators) and a finished group always has a place: nothing is
ever dropped for lack of room. Thread-safe: in async mode the rollout stream puts from its own
thread while the driver takes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from rlhf.types import SampleGroup


def group_version(group: SampleGroup) -> int:
    """The policy version that generated the group (one request, so one version for all its samples)."""
    return min(s.policy_version for s in group.samples)


@dataclass
class _Ready:
    order: int  # admission order (the order the prompts were handed out); arrival order by default
    group: SampleGroup
    put_at: float  # time.monotonic() when it arrived


class BufferClosed(RuntimeError):
    """The buffer was closed while a caller waited on it (the run is stopping or the producer failed)."""


class ReplayBuffer:
    def __init__(self, capacity_groups: int):
        if capacity_groups <= 0:
            raise ValueError(f"replay buffer capacity must be > 0, got {capacity_groups}")
        self.capacity = capacity_groups
        self._cond = threading.Condition()
        self._ready: list[_Ready] = []
        self._seq = 0
        self._closed: BaseException | None = None
        self.reserved = 0  # slots held: groups in flight plus groups ready
        self.total_put = self.total_taken = self.total_dropped = 0
        self.blocked_s = 0.0  # producers waiting for a free slot (backpressure), summed
        self.wait_s = 0.0  # the trainer waiting for a batch, summed
        self.last_age_s = 0.0  # mean seconds the last batch's groups sat ready before being taken

    # ---- the producer's side ----
    def reserve(self, timeout: float | None = None) -> bool:
        """Hold a slot for a prompt about to be generated; blocks while the buffer is full. False on timeout."""
        t0 = time.monotonic()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closed or self.reserved < self.capacity, timeout)
            self.blocked_s += time.monotonic() - t0
            self._raise_if_closed()
            if not ok:
                return False
            self.reserved += 1
            return True

    def release(self, n: int = 1) -> None:
        """Give back slots whose groups will never be put (filtered, or the run is ending)."""
        with self._cond:
            if n > self.reserved - len(self._ready):
                raise ValueError(f"releasing {n} slots, only {self.reserved - len(self._ready)} are in flight")
            self.reserved -= n
            self._cond.notify_all()

    def put(self, group: SampleGroup, order: int | None = None) -> None:
        """A finished, scored group into its reserved slot; batches are ordered by version, then `order`."""
        if any(s.reward != s.reward for s in group.samples):  # NaN: the reward stage did not score it
            raise ValueError(f"unscored sample of prompt {group.prompt.index} put into the replay buffer")
        with self._cond:
            if len(self._ready) >= self.reserved:
                raise RuntimeError(f"group of prompt {group.prompt.index} put without a reserved slot")
            self._ready.append(_Ready(self._seq if order is None else order, group, time.monotonic()))
            self._seq += 1
            self.total_put += 1
            self._cond.notify_all()

    # ---- the trainer's side ----
    def wait_ready(self, num_groups: int, min_version: int = 0, timeout: float | None = None) -> None:
        """Block until num_groups groups of version >= min_version are ready (the trainer's wait)."""
        if num_groups > self.capacity:
            raise ValueError(f"asked for {num_groups} groups, more than the capacity {self.capacity}")
        t0 = time.monotonic()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closed or self._count_ready(min_version) >= num_groups, timeout)
            self.wait_s += time.monotonic() - t0
            self._raise_if_closed()
            if not ok:
                raise TimeoutError(f"no batch of {num_groups} groups within {timeout:g} s "
                                   f"({len(self._ready)} ready, {self.reserved - len(self._ready)} in flight)")

    def take(self, num_groups: int, min_version: int = 0) -> tuple[list[SampleGroup], list[SampleGroup]]:
        """(batch, dropped), without waiting: ready groups older than min_version are removed and
        returned as `dropped` (for the caller to count), then the num_groups oldest of the rest (by
        version, then order) are the batch."""
        with self._cond:
            dropped = [r.group for r in self._ready if group_version(r.group) < min_version]
            self._ready = [r for r in self._ready if group_version(r.group) >= min_version]
            if num_groups > len(self._ready):
                raise LookupError(f"asked for {num_groups} groups of version >= {min_version}, "
                                  f"{len(self._ready)} are ready")
            self._ready.sort(key=lambda r: (group_version(r.group), r.order))
            taken, self._ready = self._ready[:num_groups], self._ready[num_groups:]
            self.reserved -= len(taken) + len(dropped)
            self.total_taken += len(taken)
            self.total_dropped += len(dropped)
            now = time.monotonic()
            self.last_age_s = sum(now - r.put_at for r in taken) / len(taken) if taken else 0.0
            self._cond.notify_all()
            return [r.group for r in taken], dropped

    def close(self, error: BaseException | None = None) -> None:
        """Wake every waiter with BufferClosed (carrying `error`, e.g. the producer's failure)."""
        with self._cond:
            self._closed = error or BufferClosed("the replay buffer was closed")
            self._cond.notify_all()

    def _raise_if_closed(self) -> None:
        if self._closed is not None:
            if isinstance(self._closed, BufferClosed):
                raise self._closed
            raise BufferClosed(f"the rollout producer failed: {self._closed!r}") from self._closed

    def count_ready(self, min_version: int = 0) -> int:
        with self._cond:
            return self._count_ready(min_version)

    def _count_ready(self, min_version: int) -> int:
        return sum(group_version(r.group) >= min_version for r in self._ready)

    def ready_prompts(self) -> list:
        with self._cond:
            return [r.group.prompt for r in self._ready]

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready)
