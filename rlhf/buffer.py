"""The replay buffer: scored sample groups go in, the trainer takes batches out, oldest first."""

from __future__ import annotations

from collections import deque

from rlhf.types import SampleGroup


class ReplayBuffer:
    def __init__(self, capacity_groups: int):
        if capacity_groups <= 0:
            raise ValueError(f"replay buffer capacity must be > 0, got {capacity_groups}")
        self.capacity = capacity_groups
        self._groups: deque[SampleGroup] = deque()
        self.total_put = 0
        self.total_taken = 0

    def put(self, groups: list[SampleGroup]) -> None:
        if len(self._groups) + len(groups) > self.capacity:
            raise OverflowError(f"replay buffer full: {len(self._groups)} + {len(groups)} groups "
                                f"> capacity {self.capacity}; the trainer is not taking batches")
        for g in groups:
            if any(s.reward != s.reward for s in g.samples):  # NaN: the reward stage did not score it
                raise ValueError(f"unscored sample of prompt {g.prompt.index} put into the replay buffer")
        self._groups.extend(groups)
        self.total_put += len(groups)

    def take(self, num_groups: int) -> list[SampleGroup]:
        if num_groups > len(self._groups):
            raise LookupError(f"asked for {num_groups} groups, the buffer holds {len(self._groups)}")
        taken = [self._groups.popleft() for _ in range(num_groups)]
        self.total_taken += len(taken)
        return taken

    def __len__(self) -> int:
        return len(self._groups)
