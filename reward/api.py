"""The reward-function API.

A reward function is a plain Python callable (or `async def`, or a class whose instances are
callable, built once) that receives, as keyword arguments,

    prompts:        list[str]        the prompt of each completion                 [B]
    completions:    list[str]        the decoded completions                       [B]
    completion_ids: list[list[int]]  their token ids                               [B][L]
    <column>:       list             every other column of the dataset row, by name [B]

and returns one float per completion (None: "does not apply" to that completion). Accept
`**kwargs` to ignore the columns you do not use. Example:

    def brevity(prompts, completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

Configured by import path (`my_pkg.rewards:brevity`) or by file path (`rewards/mine.py:brevity`).
A function of one sample, `score(prompt, completion, **row) -> float`, becomes one of this form with
the `per_sample` decorator (below).

All functions of a batch run at once: sync ones in a thread pool of `reward.workers` threads, async
ones together on one event loop in a thread of its own (an async function must not block that
loop: one that calls time.sleep stalls the others, and all of them may time out). A function runs
beside the others but not beside itself, unless an abandoned call of it (below) is still running;
so a class-based reward with state needs no lock unless it shares that state.

Failure policy. A call fails when it raises ("raised"), does not return within `reward.timeout_s`
("timeout"), returns something that is not a list or tuple ("wrong_type") or one of the wrong
length ("wrong_count"); these fail every sample of the batch for that function. A single value
fails its sample alone when it is NaN or inf ("not_finite") or not a real number (a bool, a string:
"wrong_type"). With `reward.on_error=raise` (the default) the first failure, in configured order,
stops the run with a RewardError naming the function, the kind and the sample (for a whole-call
failure: the batch size and its first sample). With `on_error=penalize` each failed sample gets
`reward.penalty` as that function's component (weighted like any value of it), and the batch's
metrics count it: `reward/<name>/failures` per function and `reward/failures/<kind>` over all
functions, both in samples. A failure is never a silent 0. None is not a failure: it means "does
not apply", and every sample still needs one function that applies (a penalty counts).

Python cannot kill a thread: a sync call that times out is abandoned, not stopped. It runs on in
the background and its result is dropped; the scorer moves to a fresh pool so the stuck thread
does not take a worker from later batches. Each abandoned call holds its thread until it returns,
and interpreter exit waits for it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.types import SampleGroup


class RewardError(RuntimeError):
    """A reward function could not be loaded, or returned something that is not a reward."""


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """`pkg.module:name` or `path/to/file.py:name` -> the callable (a class is instantiated once)."""
    fn = load_object(spec, "reward function", RewardError)
    if inspect.isclass(fn):
        fn = fn()  # a reward with state (a loaded verifier, a compiled regex table) is set up once
    if not callable(fn):
        raise RewardError(f"reward function {spec!r} is a {type(fn).__name__}, not a callable")
    return fn


def load_object(spec: str, what: str, error: type[Exception], placeholder: str = "fn") -> Any:
    """`pkg.module:name` or `path/to/file.py:name` -> that attribute as it is (a class stays a class).

    The one loader of user code named in a config (reward functions, environments, tools). `what`
    names the thing in errors ("reward function", "environment"), which are raised as `error`.
    A file is imported once per process under a name derived from its path, so two files named
    reward.py do not collide and a file that holds both a reward and an environment is one module.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise error(f"{what} {spec!r} must look like 'pkg.module:{placeholder}' or "
                    f"'path/to/file.py:{placeholder}'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target), spec, what, error)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise error(f"{what} {spec!r}: cannot import module {target!r}: {e}") from e
    if not hasattr(module, name):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise error(f"{what} {spec!r}: {target} has no {name!r} (it defines {defined})")
    return getattr(module, name)


def _import_file(path: Path, spec: str, what: str, error: type[Exception]) -> Any:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise error(f"{what} {spec!r}: file {path} does not exist")
    mod_name = "rlhf_user_module_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise error(f"{what} {spec!r}: importing {path} failed: {e!r}") from e
    return module


def per_sample(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns a reward of one sample into a reward function of the batch:

        @per_sample
        def digits(prompt, completion, charset, **kwargs):  # -> float | None
            return sum(c in charset for c in completion) / max(len(completion), 1)

    `fn` gets, by keyword, `prompt`, `completion`, `completion_ids` (None when the caller gave none)
    and each dataset column's value for that sample. The wrapper has the batch signature and keeps
    `fn`'s name. For an `async def` fn the wrapper is async too and awaits the samples concurrently
    (asyncio.gather), so a fn that waits on I/O waits once per batch, not once per sample.
    """
    def split(prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None,
              columns: dict[str, list]) -> list[dict[str, Any]]:
        clash = sorted({"prompt", "completion", "completion_ids"} & columns.keys())
        if clash:
            raise RewardError(f"per-sample reward {getattr(fn, '__name__', fn)!r}: dataset column {clash[0]!r} "
                              f"clashes with a per-sample argument; rename it")
        ids = completion_ids if completion_ids is not None else [None] * len(prompts)
        return [{"prompt": p, "completion": c, "completion_ids": i, **{k: v[n] for k, v in columns.items()}}
                for n, (p, c, i) in enumerate(zip(prompts, completions, ids))]

    if _is_async(fn):
        @functools.wraps(fn)
        async def batched_async(prompts: list[str], completions: list[str],
                                completion_ids: list[list[int]] | None = None, **columns: list) -> list:
            rows = split(prompts, completions, completion_ids, columns)
            return list(await asyncio.gather(*(fn(**row) for row in rows)))

        return batched_async

    @functools.wraps(fn)
    def batched(prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
                **columns: list) -> list:
        return [fn(**row) for row in split(prompts, completions, completion_ids, columns)]

    return batched


@dataclass(frozen=True)
class WeightedReward:
    name: str  # as configured, used in metric names and errors
    fn: Callable[..., Any]
    weight: float = 1.0


FAILURE_KINDS = ("raised", "timeout", "not_finite", "wrong_type", "wrong_count")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Outcome:
    """What one call of one function on the batch came to: a value, an exception, or no answer in time."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False


@dataclass(frozen=True)
class _Failure:
    kind: str  # one of FAILURE_KINDS
    samples: range | tuple[int, ...]  # indices in the batch: all of it for a whole-call failure
    message: str
    cause: BaseException | None = None


class _DaemonPool:
    """`workers` daemon threads running submitted calls, each returning a concurrent.futures.Future.

    Not a ThreadPoolExecutor: the interpreter joins those threads at exit, so a reward call that never
    returns (abandoned after its timeout) would keep the run's process alive forever. Daemon threads
    do not; the abandoned call dies with the process.
    """

    def __init__(self, workers: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = workers
        for i in range(workers):
            threading.Thread(target=self._work, name=f"reward-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  (handed to the caller through the future)
                future.set_exception(e)

    def shutdown(self) -> None:
        """Idle threads exit; a thread stuck in a call exits when (if) the call returns."""
        for _ in range(self._workers):
            self._jobs.put((None, None, None))


class RewardScorer:
    """Calls every reward function on a batch of groups and writes each sample's weighted reward.

    The total is sum_k weight_k * r_k over the functions that returned a value for the sample; a
    sample that no function applies to is an error (it would otherwise train on a made-up 0). Under
    on_error="penalize" a failed value is replaced by `penalty` (so weight_k * penalty enters the
    total). A multi-turn sample's environment reward (`Sample.env_reward`, with `environment`) is
    added to its total with weight 1. The module docstring describes the failure kinds, the timeout
    and the concurrency.
    """

    def __init__(self, rewards: list[WeightedReward], on_error: Literal["raise", "penalize"] = "raise",
                 penalty: float = 0.0, timeout_s: float = 60.0, workers: int = 4, environment: bool = False):
        if not rewards and not environment:
            raise RewardError("no reward functions configured (and no environment rewards the samples)")
        if on_error not in ("raise", "penalize"):
            raise RewardError(f"on_error must be 'raise' or 'penalize', not {on_error!r}")
        if not math.isfinite(penalty):
            raise RewardError(f"penalty must be a finite number, not {penalty!r}")
        if not timeout_s > 0 or workers < 1:
            raise RewardError(f"timeout_s must be > 0 and workers >= 1, not {timeout_s!r} and {workers!r}")
        self.rewards = rewards
        self.on_error = on_error
        self.penalty = float(penalty)
        self.timeout_s = float(timeout_s)
        self.workers = workers
        self._pool = _DaemonPool(workers)

    def score(self, groups: list[SampleGroup]) -> dict[str, float]:
        samples = [s for g in groups for s in g.samples]
        outcomes = self._call_all(_reward_kwargs(samples))
        totals = [0.0] * len(samples)
        applied = [False] * len(samples)
        metrics: dict[str, float] = {}
        failed_by_kind = dict.fromkeys(FAILURE_KINDS, 0)
        for r, outcome in zip(self.rewards, outcomes):
            values, failures = _check(r.name, outcome, samples, self.timeout_s)
            if failures and self.on_error == "raise":
                raise RewardError(failures[0].message) from failures[0].cause
            given = [v for v in values if v is not None]
            metrics[f"reward/{_short(r.name)}/mean"] = sum(given) / len(given) if given else math.nan
            for f in failures:
                failed_by_kind[f.kind] += len(f.samples)
                for i in f.samples:
                    values[i] = self.penalty
            for i, v in enumerate(values):
                if v is None:
                    continue
                totals[i] += r.weight * v
                applied[i] = True
                samples[i].reward_components[r.name] = v
            if self.on_error == "penalize":
                n_failed = sum(len(f.samples) for f in failures)
                metrics[f"reward/{_short(r.name)}/failures"] = float(n_failed)
                if failures:
                    logger.warning("%d sample(s) got reward.penalty=%g from %r; the first failure: %s",
                                n_failed, self.penalty, r.name, failures[0].message)
        if self.on_error == "penalize":  # zeros too, so a dashboard shows a flat line, not a gap
            metrics.update({f"reward/failures/{kind}": float(n) for kind, n in failed_by_kind.items()})
        env = [i for i, s in enumerate(samples) if s.env_reward is not None]  # multi-turn: the environment's own
        for i in env:
            totals[i] += samples[i].env_reward
            applied[i] = True
            samples[i].reward_components["env"] = samples[i].env_reward
        if env:
            metrics["reward/env/mean"] = sum(samples[i].env_reward for i in env) / len(env)
        for i, s in enumerate(samples):
            if not applied[i]:
                raise RewardError(f"no reward function returned a value for sample {i} "
                                  f"(prompt {s.prompt.text!r}, completion {s.text[:80]!r})")
            s.reward = totals[i]
        return metrics

    def _call_all(self, kwargs: dict[str, list]) -> list[_Outcome]:
        """Starts every function on the batch at once and returns what each came to, in configured order.

        A call's timeout runs from when it starts. A sync call still queued for a worker timeout_s
        after the batch began (more sync functions than workers, or workers stuck) is cancelled
        and times out too, so a score() never waits much longer than timeout_s.
        """
        began = time.monotonic()
        started: dict[int, float] = {}  # function index -> when its call began (written by the worker threads)
        futures: list[Future] = []
        is_async = [_is_async(r.fn) for r in self.rewards]
        coroutines = []
        for k, r in enumerate(self.rewards):
            args = {col: list(v) for col, v in kwargs.items()}  # a function that edits its lists cannot touch another's
            if is_async[k]:
                futures.append(Future())
                coroutines.append(_call_async(r.fn, args, futures[k], started, k, self.timeout_s))
            else:
                futures.append(self._pool.submit(_call_sync, r.fn, args, started, k))
        if coroutines:  # a loop of its own: the caller may be sync code, or already inside a running loop
            threading.Thread(target=asyncio.run, args=(_gather(coroutines),), name="reward-async", daemon=True).start()

        outcomes: list[_Outcome] = [_Outcome()] * len(futures)
        pending = set(range(len(futures)))
        abandoned_thread = False
        while pending:
            for k in [k for k in pending if futures[k].done()]:
                outcomes[k] = futures[k].result()
                pending.discard(k)
            now = time.monotonic()
            for k in sorted(pending):
                if futures[k].done() or now < started.get(k, began) + self.timeout_s:
                    continue
                if k not in started and not futures[k].cancel():  # it got a worker just now: give it its time
                    started.setdefault(k, now)
                    continue
                outcomes[k] = _Outcome(timed_out=True)
                pending.discard(k)
                abandoned_thread |= k in started and not is_async[k]
            if pending:
                deadline = min(started.get(k, began) for k in pending) + self.timeout_s
                wait([futures[k] for k in pending], timeout=max(deadline - time.monotonic(), 0.0),
                     return_when=FIRST_COMPLETED)
        if abandoned_thread:  # the stuck thread keeps its worker; later batches get a full pool
            self._pool.shutdown()
            self._pool = _DaemonPool(self.workers)
        return outcomes


def _reward_kwargs(samples: list) -> dict[str, list]:
    kwargs: dict[str, list] = {
        "prompts": [s.prompt.text for s in samples],
        "completions": [s.text for s in samples],
        "completion_ids": [list(s.completion_ids) for s in samples],
    }
    for col in samples[0].prompt.row if samples else ():
        if col in kwargs:
            raise RewardError(f"dataset column {col!r} clashes with a reward-function argument; rename it")
        kwargs[col] = [s.prompt.row[col] for s in samples]
    return kwargs


def _is_async(fn: Callable[..., Any]) -> bool:
    """`async def` functions and instances of classes with an `async def __call__`."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _call_sync(fn: Callable[..., Any], args: dict[str, list], started: dict[int, float], k: int) -> _Outcome:
    started[k] = time.monotonic()
    try:
        out = fn(**args)
        if inspect.isawaitable(out):  # a sync callable that hands back a coroutine
            out = asyncio.run(_await(out))
        return _Outcome(value=_plain(out))
    except BaseException as e:  # whatever a user's function throws is that function's failure
        return _Outcome(error=e)


async def _call_async(fn: Callable[..., Any], args: dict[str, list], result: Future, started: dict[int, float],
                      k: int, timeout_s: float) -> None:
    if not result.set_running_or_notify_cancel():  # timed out before the loop even began
        return
    started[k] = time.monotonic()
    try:
        out = fn(**args)
        if inspect.isawaitable(out):
            task = asyncio.ensure_future(out)
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                task.cancel()
                result.set_result(_Outcome(timed_out=True))
                return
            out = task.result()
        result.set_result(_Outcome(value=_plain(out)))
    except BaseException as e:
        result.set_result(_Outcome(error=e))


async def _gather(coroutines: list) -> None:
    await asyncio.gather(*coroutines)


async def _await(x: Any) -> Any:
    return await x


def _plain(values: Any) -> Any:
    return values.tolist() if hasattr(values, "tolist") else values  # numpy array or torch tensor


def _check(name: str, outcome: _Outcome, samples: list, timeout_s: float) -> tuple[list[float | None], list[_Failure]]:
    """The function's value for each sample (None where it does not apply or failed) and its failures."""
    n = len(samples)
    first = f"the first is {_where(samples, 0)}" if samples else "the batch is empty"

    def whole(kind: str, what: str, cause: BaseException | None = None) -> tuple[list[float | None], list[_Failure]]:
        return [None] * n, [_Failure(kind, range(n), f"reward function {name!r} {what}; {first} [{kind}]", cause)]

    if outcome.timed_out:
        return whole("timeout", f"did not return within timeout_s={timeout_s:g} s on a batch of {n} completions")
    if outcome.error is not None:
        e = outcome.error
        return whole("raised", f"raised {_clip(f'{type(e).__name__}: {e}', 200)} on a batch of {n} completions", e)
    values = outcome.value
    if not isinstance(values, (list, tuple)):
        return whole("wrong_type", f"returned a {type(values).__name__}; it must return a list of {n} floats")
    if len(values) != n:
        return whole("wrong_count", f"returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    failures: list[_Failure] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            kind = "wrong_type"
        elif not math.isfinite(float(v)):
            kind = "not_finite"
        else:
            out.append(float(v))
            continue
        out.append(None)
        failures.append(_Failure(kind, (i,), f"reward function {name!r} returned {_clip(repr(v), 80)} for "
                                             f"{_where(samples, i)}; expected a finite float [{kind}]"))
    return out, failures


def _where(samples: list, i: int) -> str:
    s = samples[i]
    return f"sample {i} (prompt {s.prompt.text!r}, completion {s.text[:80]!r})"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _short(name: str) -> str:
    return name.rpartition(":")[2]
