"""vLLM's LLMEngine driven from an asyncio actor, on one thread of its own.

Why not vLLM's AsyncLLM: it always runs its engine core in a process of its own, and on a laptop's two
cores that boundary costs a sixth of the generation time (bench/rollout_overhead.py). LLMEngine runs the
engine core in this process when VLLM_ENABLE_V1_MULTIPROCESSING=0 (rollout.generator.generator_env sets it
on CPU at TP 1), which is how `vllm.LLM.generate` runs; elsewhere it keeps vLLM's default, an engine-core
process behind a blocking client, as `vllm.LLM` does on GPU.

The engine thread builds the engine and then serves a queue of commands (add a request, abort, a
collective RPC, ...), stepping the engine whenever a request is waiting, with no wait between steps.
Every engine call therefore runs on that one thread, in the order it was made: the engine's
single-threaded API is safe to use from many coroutines, vLLM's OpenMP threads stay bound to the thread
that set them up, and the event loop stays free while a step runs. The loop is woken once per finished
request, not once per step: a thread hand-off per step measured 12 % slower than `vllm.LLM.generate` at
3.7M parameters, where a step takes ~6 ms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def _settle(done: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if done.done():  # the waiting coroutine was cancelled
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(value)


class EngineThread:
    """An LLMEngine (`make()`, called on the engine thread) with awaitable calls."""

    def __init__(self, make: Callable[[], Any]):
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # request id -> (its loop, its future); touched on the engine thread only
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._error: BaseException | None = None
        built: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=self._serve, args=(make, built), name="vllm-engine", daemon=True).start()
        built.result()  # raises what make() raised; on success the thread has set self.llm

    async def call(self, fn: Callable, *args, **kwargs) -> Any:
        """fn(*args, **kwargs) on the engine thread, between two steps."""
        return await self._on_thread(lambda _waiter: fn(*args, **kwargs), answer=True)

    async def generate(self, request_id: str, prompt: dict, params) -> Any:
        """The request's final RequestOutput (params must ask for FINAL_ONLY), or None if it was aborted."""
        def add(waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future]) -> None:
            self.llm.add_request(request_id, prompt, params)  # e.g. a prompt over max_model_len raises
            self._waiting[request_id] = waiter  # answered when the request finishes or is aborted

        try:
            return await self._on_thread(add, answer=False)
        except asyncio.CancelledError:
            self._commands.put(lambda: self._abort([request_id]))
            raise

    async def _on_thread(self, fn: Callable[[tuple], Any], answer: bool) -> Any:
        """fn((this loop, a future)) on the engine thread; what it raises is raised here. With `answer`, its
        result is returned; otherwise fn keeps the pair, and whoever settles the future answers."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def command() -> None:
            try:
                result = fn((loop, done))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                if answer:
                    loop.call_soon_threadsafe(_settle, done, result, None)

        self._commands.put(command)
        return await done

    def _check_alive(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the vLLM engine failed earlier: {self._error!r}") from self._error

    async def abort(self, request_ids: list[str]) -> None:
        """Abort these requests: their generate() calls return None. A request that finished in the step
        before the abort has already been answered with its output."""
        await self.call(self._abort, list(request_ids))

    def _abort(self, request_ids: list[str]) -> None:
        self.llm.abort_request(request_ids)
        for request_id in request_ids:  # the sync engine reports nothing for an aborted request
            self._answer(request_id, None)

    def _answer(self, request_id: str, value: Any, error: BaseException | None = None) -> None:
        if (waiter := self._waiting.pop(request_id, None)) is not None:
            loop, done = waiter
            loop.call_soon_threadsafe(_settle, done, value, error)

    def _serve(self, make: Callable[[], Any], built: concurrent.futures.Future) -> None:
        try:
            self.llm = make()
        except BaseException as e:  # noqa: BLE001 - raised in __init__
            built.set_exception(e)
            return
        built.set_result(self.llm)
        try:
            while True:
                try:  # every queued command; wait for one only when nothing is generating
                    command = self._commands.get(block=not self._waiting)
                    while True:
                        self._run(command)
                        command = self._commands.get_nowait()
                except queue.Empty:
                    pass
                if self._waiting:
                    self._step()
        except BaseException as e:  # the thread ends: its waiters get the error, later calls are refused
            self._error = e
            for request_id in list(self._waiting):
                self._answer(request_id, None, e)
            raise

    @staticmethod
    def _run(command: Callable[[], None]) -> None:
        """Commands hand their errors to their callers; one that has no caller (the abort of a cancelled
        request) must not end the thread either."""
        try:
            command()
        except Exception:  # noqa: BLE001
            logger.exception("vLLM engine thread: a command without a caller failed")

    def _step(self) -> None:
        try:
            outputs = self.llm.step()
        except Exception as e:  # noqa: BLE001 - every waiter gets the engine's error, later requests too
            self._error = e
            for request_id in list(self._waiting):
                self._answer(request_id, None, e)
            return
        for out in outputs:
            if out.finished:
                self._answer(out.request_id, out)
        if self._waiting and not self.llm.has_unfinished_requests():  # never step an empty engine forever
            lost = RuntimeError(f"the vLLM engine dropped requests {sorted(self._waiting)} without finishing them")
            for request_id in list(self._waiting):
                self._answer(request_id, None, lost)
