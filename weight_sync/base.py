"""What every weight-sync group is, whatever carries the bytes: the interface group.py (gloo, NCCL)
and ipc.py (CUDA IPC, shared memory) implement, and the host-side wait with a deadline that the
backends whose transfers finish on a device stream share. Both modules import this one; neither
imports the other's internals."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class Pending:
    """An in-flight broadcast; wait() returns when the tensor is sent (or received) and raises on timeout."""

    def wait(self) -> None:
        raise NotImplementedError


class SyncGroup:
    rank: int
    world_size: int
    device: torch.device
    zero_copy_ok = True  # may the sender hand a parameter's own storage to broadcast()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        """Start broadcasting `tensor` from `src`; the caller may pack or load other data meanwhile."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def wait_until(done: Callable[[], bool], timeout_s: float, what: str, on_timeout: Callable[[], None] | None = None,
               poll_s: float = 0.0005, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once done() is true; after timeout_s, call on_timeout (e.g. abort the communicator, which
    releases kernels stuck waiting for a dead peer) and raise TimeoutError naming `what`. Polls with
    sleeps growing from poll_s to 20 ms: a 64 MB bucket takes ~1 ms on NVLink, a hang is a timeout."""
    deadline = clock() + timeout_s
    pause = poll_s
    while not done():
        if clock() > deadline:
            if on_timeout is not None:
                on_timeout()
            raise TimeoutError(f"weight sync: waited {timeout_s:g} s for {what}")
        sleep(pause)
        pause = min(pause * 2, 0.02)


class EventPending(Pending):
    """A broadcast queued on a device stream, done when `event` (a torch.cuda.Event recorded after it)
    has completed. wait() blocks the host until then, so that the sender's return means the bytes have
    moved (and sync/seconds times the transfer), and a peer that never joins the collective fails the
    push within the group's timeout instead of leaving a kernel spinning."""

    def __init__(self, event, timeout_s: float, what: str, on_timeout: Callable[[], None] | None = None):
        self._event, self._timeout_s, self._what, self._on_timeout = event, timeout_s, what, on_timeout

    def wait(self) -> None:
        wait_until(self._event.query, self._timeout_s, self._what, self._on_timeout)
