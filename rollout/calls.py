"""Running user code (environments, tools) off the caller's thread, with a deadline.

`call_with_deadline(fn, *args, timeout_s=..., lane=...)` returns at once with a
concurrent.futures.Future that resolves to an `Outcome`: the value, the exception, or "timed out".
The future never raises: classifying the outcome is the caller's business (rollout.env,
rollout.tools). A thread waits with `future.result()`, a coroutine with
`await asyncio.wrap_future(future)`.

Where the call runs:
- `async def` functions run on one shared event loop in a daemon thread ("rollout-loop"); a timeout
  cancels the task, so an async call that times out is stopped.
- Sync functions run on `lane` (one daemon thread that runs its calls in order, one at a time: one
  environment instance is never called from two threads at once) or, without a lane, on a daemon
  thread of their own. Python cannot kill a thread: a sync call that times out is abandoned, not
  stopped. It runs on in the background and its result is dropped; a lane stays blocked behind it
  (its later calls wait, each with its own deadline from when it was submitted).
- A sync function that returns an awaitable (a coroutine from a plain `def`) has it awaited on the
  shared loop, under the same deadline.

The deadlines are timers on the shared loop, so waiting costs no thread per call.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """What one call came to: a value, an exception, or no answer in time."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False
    seconds: float = 0.0  # wall time from the call's submission to its outcome


class Lane:
    """One daemon thread running submitted calls in order. Started on first use."""

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def stop(self) -> None:
        """The thread exits once the calls queued before this have run (at once if it is idle)."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def shared_loop() -> asyncio.AbstractEventLoop:
    """The event loop that runs async environments and tools and keeps every deadline."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rollout-loop", daemon=True).start()
            _loop = loop
        return _loop


def is_async(fn: Callable[..., Any]) -> bool:
    """`async def` functions and methods, and instances of classes with an `async def __call__`."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def call_with_deadline(fn: Callable[..., Any], *args: Any, timeout_s: float, lane: Lane | None = None,
                       name: str = "rollout-call", run_late: bool = False) -> Future:
    """Starts fn(*args) off this thread; the returned Future resolves to an Outcome within ~timeout_s.

    A sync call still queued on its lane at its deadline is not started when the lane frees up,
    unless `run_late` (an environment's close(), which must run even behind a stuck step).
    """
    began = time.monotonic()
    result: Future = Future()
    result.set_running_or_notify_cancel()
    settle_lock = threading.Lock()
    loop = shared_loop()

    def settle(outcome: Outcome) -> bool:
        with settle_lock:
            if result.done():
                return False
            result.set_result(outcome)
            return True

    def finished(value: Any = None, error: BaseException | None = None) -> None:
        settle(Outcome(value=value, error=error, seconds=time.monotonic() - began))

    def expire() -> None:
        if settle(Outcome(timed_out=True, seconds=time.monotonic() - began)) and task is not None:
            task.cancel()

    task: asyncio.Future | None = None

    async def run_async(awaitable: Any) -> None:
        nonlocal task
        task = asyncio.ensure_future(awaitable)
        if result.done():  # expired before the loop got to it
            task.cancel()
            return
        try:
            finished(value=await task)
        except asyncio.CancelledError:
            return  # cancelled by expire(), which settled the outcome
        except BaseException as e:  # whatever user code throws is its outcome
            finished(error=e)

    def run_sync() -> None:
        if result.done() and not run_late:  # it waited on its lane past its deadline: do not start it at all
            return
        try:
            out = fn(*args)
            if inspect.isawaitable(out):
                asyncio.run_coroutine_threadsafe(run_async(out), loop)
                return
        except BaseException as e:
            finished(error=e)
            return
        finished(value=out)

    loop.call_soon_threadsafe(loop.call_later, timeout_s, expire)
    if is_async(fn):
        try:
            coroutine = fn(*args)
        except BaseException as e:  # a bad argument count raises before any coroutine exists
            finished(error=e)
            return result
        asyncio.run_coroutine_threadsafe(run_async(coroutine), loop)
    elif lane is not None:
        lane.submit(run_sync)
    else:
        threading.Thread(target=run_sync, name=name, daemon=True).start()
    return result
