"""rollout.engine.EngineThread with a fake engine (the real one runs in every end-to-end test): outputs
reach the coroutine that added the request, aborts answer None, and every failure is an error, never a
hang."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from rollout.engine import EngineThread


class FakeEngine:
    """LLMEngine's calls that EngineThread makes. A request finishes after `steps` steps (default 1); the
    thread of every call is recorded."""

    def __init__(self, steps: dict[str, int] | None = None):
        self.steps = steps or {}
        self.running: dict[str, int] = {}
        self.threads: set[int] = set()
        self.calls: list[str] = []
        self.fail_step = False
        self.fail_abort = False
        self.drop = False

    def add_request(self, request_id, prompt, params):
        self.threads.add(threading.get_ident())
        if prompt.get("prompt_token_ids") == []:
            raise ValueError("empty prompt")
        self.calls.append(f"add {request_id}")
        self.running[request_id] = self.steps.get(request_id, 1)

    def step(self):
        self.threads.add(threading.get_ident())
        if self.fail_step:
            raise RuntimeError("engine core died")
        if self.drop:
            self.running.clear()
            return []
        for request_id in self.running:
            self.running[request_id] -= 1
        done = [r for r, left in self.running.items() if left <= 0]
        for request_id in done:
            del self.running[request_id]
            self.calls.append(f"done {request_id}")
        return [SimpleNamespace(request_id=r, finished=True, outputs=[r]) for r in done]

    def has_unfinished_requests(self):
        return bool(self.running)

    def abort_request(self, request_ids):
        self.threads.add(threading.get_ident())
        if self.fail_abort:
            raise RuntimeError("abort failed")
        self.calls.append(f"abort {','.join(request_ids)}")
        for request_id in request_ids:
            self.running.pop(request_id, None)

    def echo(self, value):
        self.threads.add(threading.get_ident())
        self.calls.append(f"echo {value}")
        return value


def run(coro):
    return asyncio.run(coro)


def test_each_request_gets_its_own_output_and_every_call_runs_on_one_thread_in_order():
    fake = FakeEngine({"a": 3, "b": 1, "c": 2})
    engine = EngineThread(lambda: fake)

    async def main():
        outs = await asyncio.gather(*(engine.generate(r, {"prompt_token_ids": [1]}, None) for r in "abc"))
        return [o.outputs for o in outs], await engine.call(fake.echo, 7)

    outs, echoed = run(main())
    assert outs == [["a"], ["b"], ["c"]] and echoed == 7
    assert fake.calls == ["add a", "add b", "add c", "done b", "done c", "done a", "echo 7"]
    assert len(fake.threads) == 1 and threading.get_ident() not in fake.threads, "one engine thread, not this one"


def test_an_aborted_request_answers_none_and_the_others_finish():
    fake = FakeEngine({"slow": 10**9, "fast": 2})
    engine = EngineThread(lambda: fake)

    async def main():
        slow = asyncio.ensure_future(engine.generate("slow", {"prompt_token_ids": [1]}, None))
        fast = await engine.generate("fast", {"prompt_token_ids": [1]}, None)
        await engine.abort(["slow", "fast"])  # "fast" is done already: nothing to answer
        return await asyncio.wait_for(slow, timeout=10), fast

    slow, fast = run(main())
    assert slow is None and fast.outputs == ["fast"]
    assert "abort slow,fast" in fake.calls and not fake.running


def test_a_refused_request_raises_its_error_and_the_engine_goes_on():
    fake = FakeEngine()
    engine = EngineThread(lambda: fake)

    async def main():
        with pytest.raises(ValueError, match="empty prompt"):
            await engine.generate("bad", {"prompt_token_ids": []}, None)
        return await engine.generate("good", {"prompt_token_ids": [1]}, None)

    assert run(main()).outputs == ["good"]


def test_a_failing_step_fails_every_waiter_and_every_later_request():
    fake = FakeEngine({"a": 5, "b": 5})
    engine = EngineThread(lambda: fake)
    fake.fail_step = True

    async def main():
        results = await asyncio.gather(*(engine.generate(r, {"prompt_token_ids": [1]}, None) for r in "ab"),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "engine core died" in str(r) for r in results), results
        with pytest.raises(RuntimeError, match="failed earlier.*engine core died"):
            await engine.generate("c", {"prompt_token_ids": [1]}, None)

    run(main())


def test_requests_the_engine_drops_are_an_error_not_a_hang():
    fake = FakeEngine({"a": 5})
    fake.drop = True
    engine = EngineThread(lambda: fake)

    async def main():
        with pytest.raises(RuntimeError, match=r"dropped requests \['a'\]"):
            await asyncio.wait_for(engine.generate("a", {"prompt_token_ids": [1]}, None), timeout=10)

    run(main())


def test_a_cancelled_request_is_aborted_in_the_engine():
    fake = FakeEngine({"a": 10**9})
    engine = EngineThread(lambda: fake)

    async def main():
        task = asyncio.ensure_future(engine.generate("a", {"prompt_token_ids": [1]}, None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.call(fake.echo, "after")

    assert run(main()) == "after"
    assert "abort a" in fake.calls and not fake.running


def test_a_failing_abort_without_a_caller_does_not_end_the_engine_thread():
    fake = FakeEngine({"a": 10**9})
    fake.fail_abort = True
    engine = EngineThread(lambda: fake)

    async def main():
        task = asyncio.ensure_future(engine.generate("a", {"prompt_token_ids": [1]}, None))
        await asyncio.sleep(0.05)
        task.cancel()  # its abort raises on the engine thread, with nobody to hand the error to
        with pytest.raises(asyncio.CancelledError):
            await task
        served = await asyncio.wait_for(engine.call(fake.echo, "still serving"), timeout=10)
        # the request is still in the engine, stepped for nobody: drop it, or this thread would spin for the
        # rest of the test session; the engine thread then answers it as dropped and goes idle
        await engine.call(fake.running.clear)
        for _ in range(500):  # the next step finds it gone
            if not (waiting := await engine.call(lambda: dict(engine._waiting))):
                break
            await asyncio.sleep(0.01)
        return served, waiting

    assert run(main()) == ("still serving", {})


def test_an_engine_that_fails_to_build_raises_in_the_constructor():
    def make():
        raise OSError("no model at /nowhere")

    with pytest.raises(OSError, match="/nowhere"):
        EngineThread(make)
