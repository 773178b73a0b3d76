"""The environment API of multi-turn rollouts.

An environment is a class, configured like a reward function by import path (`my_pkg.envs:Maze`)
or file path (`envs/maze.py:Maze`). One instance per trajectory, with this protocol (the shape of
skyrl-gym's `BaseTextEnv`, so a class written for it runs unchanged):

    init(prompt_messages: list[dict]) -> (messages: list[dict], info: dict)
        The conversation the model starts from (often the prompt as it is) and any metadata.
    step(action_text: str) -> {"observations": list[dict], "reward": float, "done": bool,
                               "metadata": dict}
        The model's turn as text; the messages to append (an empty list: none), the step's reward,
        whether the episode is over. "metadata" may be left out; "postprocessed_action" (skyrl-gym)
        is kept but not used: the trained tokens are always the sampled ones.
    close() -> None            (optional) always called once, after the last call, even on failure.

Each method may be `async def`. Messages are OpenAI-style dicts with a str "role" and a "content".

Construction. The class is built with keyword arguments: those given in the config (`env.kwargs`)
plus the dataset row's columns that its constructor names (all of them if it takes **kwargs); a
column that clashes with a configured argument is an error. A constructor with the skyrl-gym
signature, `__init__(self, env_config, extras)`, is called as skyrl-gym calls it instead:
`env_config` the configured arguments (a dict that also allows attribute access, as OmegaConf's
DictConfig does) and `extras` the dataset row.

Running. `EnvRunner` runs one environment's calls off the caller's thread (rollout.calls): sync
methods in order on a thread of the runner's own, async ones on the shared event loop, each with
`timeout_s` (construction counts towards init's). Each method returns a concurrent.futures.Future
at once, so a generator keeps generating for other trajectories while this one waits.

Failure policy, as for rewards (`env.on_error: raise | penalize`). A call fails when it raises
("raised"), does not return within timeout_s ("timeout"), returns something that is not what the
protocol says ("wrong_type": step not a dict, init not a pair; "wrong_shape": a missing key, an
observation that is not a message, done not a bool, a reward not a real number) or a reward that is
NaN or inf ("not_finite"). With on_error="raise" the future raises EnvError naming the class, the
call and the kind. With "penalize" a failed step ends the trajectory: it resolves to a StepResult
with reward=penalty, done=True, no observations and `failure` set; a failed init resolves to an
InitResult with the prompt messages and `failure` set (the caller ends that trajectory before its
first turn); a failed close is recorded. Every failure is in `runner.failures`, by kind. After a
failed init or step the environment's state is unknown, so the runner refuses further init/step
calls (close still runs). A sync call that times out is abandoned, not stopped (Python cannot kill
a thread); the runner's close() then runs once that call returns, if it ever does.
"""

from __future__ import annotations

import inspect
import math
import numbers
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from reward.api import load_object
from rollout.calls import Lane, Outcome, call_with_deadline

Message = dict[str, Any]  # {"role": str, "content": str | list, ...} as the chat template takes it
ENV_FAILURE_KINDS = ("raised", "timeout", "wrong_type", "wrong_shape", "not_finite")
OnError = Literal["raise", "penalize"]


class EnvError(RuntimeError):
    """An environment could not be loaded or built, or one of its calls failed under on_error=raise."""

    def __init__(self, message: str, failure: EnvFailure | None = None):
        super().__init__(message)
        self.failure = failure


@dataclass(frozen=True)
class EnvFailure:
    kind: str  # one of ENV_FAILURE_KINDS
    call: str  # "init" (construction included), "step" or "close"
    message: str  # names the class, the call and what was wrong
    cause: BaseException | None = None


@dataclass(frozen=True)
class InitResult:
    messages: list[Message]  # the conversation the first model turn continues
    info: dict[str, Any]
    failure: EnvFailure | None = None  # set under on_error=penalize: end this trajectory unplayed


@dataclass(frozen=True)
class StepResult:
    observations: list[Message]  # messages to append before the next model turn ([] for none)
    reward: float
    done: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    postprocessed_action: str | None = None  # skyrl-gym's; recorded, never trained on
    failure: EnvFailure | None = None  # set under on_error=penalize (then reward=penalty, done=True)


class AttrDict(dict):
    """A dict whose keys also read as attributes: skyrl-gym environments read `env_config.x`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def load_env_class(spec: str) -> type:
    """`pkg.module:Class` or `path/to/file.py:Class` -> the class, checked to have a step method."""
    cls = load_object(spec, "environment", EnvError, placeholder="Class")
    if not inspect.isclass(cls):
        raise EnvError(f"environment {spec!r} is a {type(cls).__name__}, not a class (one instance is built "
                       f"per trajectory)")
    if not callable(getattr(cls, "step", None)):
        raise EnvError(f"environment {spec!r}: class {cls.__name__} has no step(action_text) method")
    return cls


def build_env(cls: type, kwargs: Mapping[str, Any], row: Mapping[str, Any]) -> Any:
    """One instance of `cls` for one trajectory (the module docstring says which arguments it gets)."""
    params = inspect.signature(cls).parameters
    if "env_config" in params and "extras" in params:  # skyrl-gym's constructor
        return cls(env_config=AttrDict(kwargs), extras=dict(row))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if not takes_any and k not in params)
    if unknown:
        raise EnvError(f"environment {cls.__name__}: env.kwargs {unknown} are not arguments of its constructor "
                       f"(it takes {sorted(params)})")
    clash = sorted(kwargs.keys() & row.keys())
    if clash:
        raise EnvError(f"environment {cls.__name__}: dataset column {clash[0]!r} clashes with env.kwargs "
                       f"{clash[0]!r}; rename one")
    columns = {k: v for k, v in row.items() if takes_any or k in params}
    return cls(**kwargs, **columns)


class EnvRunner:
    """Runs one environment instance for one trajectory: built on the first init, closed by close()."""

    def __init__(self, cls: type, kwargs: Mapping[str, Any] | None = None, row: Mapping[str, Any] | None = None,
                 timeout_s: float = 30.0, on_error: OnError = "raise", penalty: float = 0.0):
        if on_error not in ("raise", "penalize"):
            raise EnvError(f"env.on_error must be 'raise' or 'penalize', not {on_error!r}")
        if not timeout_s > 0 or not math.isfinite(penalty):
            raise EnvError(f"env.timeout_s must be > 0 and env.penalty finite, not {timeout_s!r} and {penalty!r}")
        self.cls = cls
        self.kwargs = dict(kwargs or {})
        self.row = dict(row or {})
        self.timeout_s = float(timeout_s)
        self.on_error = on_error
        self.penalty = float(penalty)
        self.failures: list[EnvFailure] = []
        self.seconds = 0.0  # wall time spent in the environment's calls (a timed-out call counts timeout_s)
        self.env: Any = None
        self._lane = Lane(f"env-{cls.__name__}")
        self._broken: EnvFailure | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- the protocol -----------------------------------------------------------------------------------

    def init(self, prompt_messages: list[Message]) -> Future:
        """-> Future[InitResult]. Builds the environment, then calls its init(prompt_messages)."""
        self._check_usable("init")
        prompt = [dict(m) for m in prompt_messages]

        def build_and_init() -> Any:
            self.env = build_env(self.cls, self.kwargs, self.row)
            return self.env.init(prompt) if self._has("init") else (prompt, {})

        if self._has("init") and _is_async_method(self.cls, "init"):
            # construction is sync; the async init is awaited on the shared loop by call_with_deadline
            async def build_then_init() -> Any:
                self.env = build_env(self.cls, self.kwargs, self.row)
                return await self.env.init(prompt)
            call = build_then_init
        else:
            call = build_and_init
        return self._chain(call_with_deadline(call, timeout_s=self.timeout_s, lane=self._lane),
                           lambda o: self._init_result(o, prompt))

    def step(self, action_text: str) -> Future:
        """-> Future[StepResult] for the model's turn as text."""
        self._check_usable("step")
        if self.env is None:
            raise EnvError(f"environment {self.cls.__name__}: step() before init() succeeded")
        return self._chain(call_with_deadline(self.env.step, action_text, timeout_s=self.timeout_s,
                                              lane=self._lane), self._step_result)

    def close(self) -> Future:
        """-> Future[EnvFailure | None]. Calls the environment's close() (once; later calls resolve to None)
        and stops the runner's thread. Runs after any call still in flight, however late."""
        with self._lock:
            already, self._closed = self._closed, True
        done: Future = Future()
        if already or self.env is None or not self._has("close"):
            self._lane.stop()
            done.set_result(None)
            return done
        future = call_with_deadline(self.env.close, timeout_s=self.timeout_s, lane=self._lane, run_late=True)
        self._lane.stop()
        if (self._broken is not None and self._broken.kind == "timeout"
                and not _is_async_method(self.cls, self._broken.call)):
            # queued behind the abandoned sync call, it runs when (if) that returns; the timeout counts once
            done.set_result(None)
            return done
        return self._chain(future, self._close_result)

    # -- outcomes -----------------------------------------------------------------------------------------

    def _init_result(self, outcome: Outcome, prompt: list[Message]) -> InitResult:
        failure = self._failure("init", outcome)
        if failure is None:
            value = outcome.value
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                failure = self._bad("init", "wrong_type", f"returned {_describe(value)}; it must return a pair "
                                                          f"(messages, info)")
            else:
                messages, info = value
                problem = _messages_problem(messages, "its messages")
                if problem is None and info is not None and not isinstance(info, Mapping):
                    problem = f"its info is {_describe(info)}, not a dict"
                if problem is not None:
                    failure = self._bad("init", "wrong_shape", problem)
                else:
                    return InitResult([dict(m) for m in messages], dict(info or {}))
        self._fail(failure)
        return InitResult(prompt, {}, failure)

    def _step_result(self, outcome: Outcome) -> StepResult:
        failure = self._failure("step", outcome)
        if failure is None:
            value = outcome.value
            if not isinstance(value, Mapping):
                failure = self._bad("step", "wrong_type", f"returned {_describe(value)}; it must return a dict with "
                                                          f"observations, reward, done (and metadata)")
            else:
                result, failure = self._parse_step(value)
                if failure is None:
                    return result
        self._fail(failure)
        return StepResult([], self.penalty, True, {}, None, failure)

    def _parse_step(self, value: Mapping) -> tuple[Any, EnvFailure | None]:
        missing = [k for k in ("observations", "reward", "done") if k not in value]
        if missing:
            return None, self._bad("step", "wrong_shape", f"returned a dict without {missing} (its keys: "
                                                          f"{sorted(map(str, value))})")
        reward, done, metadata = value["reward"], value["done"], value.get("metadata")
        action = value.get("postprocessed_action")
        problem = _messages_problem(value["observations"], "its observations")
        if problem is None and (isinstance(reward, bool) or not isinstance(reward, numbers.Real)):
            problem = f"its reward is {_describe(reward)}, not a real number"
        if problem is None and not _is_bool(done):
            problem = f"its done is {_describe(done)}, not a bool"
        if problem is None and metadata is not None and not isinstance(metadata, Mapping):
            problem = f"its metadata is {_describe(metadata)}, not a dict"
        if problem is None and action is not None and not isinstance(action, str):
            problem = f"its postprocessed_action is {_describe(action)}, not a str or None"
        if problem is not None:
            return None, self._bad("step", "wrong_shape", problem)
        if not math.isfinite(float(reward)):
            return None, self._bad("step", "not_finite", f"returned reward {reward!r}")
        return StepResult([dict(m) for m in value["observations"]], float(reward), bool(done),
                          dict(metadata or {}), action), None

    def _close_result(self, outcome: Outcome) -> EnvFailure | None:
        failure = self._failure("close", outcome)
        if failure is not None:
            self.failures.append(failure)
            if self.on_error == "raise":
                raise EnvError(failure.message, failure) from failure.cause
        return failure

    def _failure(self, call: str, outcome: Outcome) -> EnvFailure | None:
        self.seconds += outcome.seconds
        if outcome.timed_out:
            return self._bad(call, "timeout", f"did not return within env.timeout_s={self.timeout_s:g} s")
        if outcome.error is not None:
            e = outcome.error
            if isinstance(e, EnvError):  # build_env's own errors (bad kwargs) are config errors, not env failures
                raise e
            text = f"{type(e).__name__}: {e}"
            return self._bad(call, "raised", f"raised {text[:300]}", e)
        return None

    def _bad(self, call: str, kind: str, what: str, cause: BaseException | None = None) -> EnvFailure:
        return EnvFailure(kind, call, f"environment {self.cls.__name__}.{call}() {what} [{kind}]", cause)

    def _fail(self, failure: EnvFailure) -> None:
        self.failures.append(failure)
        self._broken = failure
        if self.on_error == "raise":
            raise EnvError(failure.message, failure) from failure.cause

    # -- plumbing -----------------------------------------------------------------------------------------

    def _chain(self, inner: Future, convert: Any) -> Future:
        """A future of convert(inner's Outcome); convert raising (on_error=raise) fails the future."""
        outer: Future = Future()
        outer.set_running_or_notify_cancel()

        def done(f: Future) -> None:
            try:
                outer.set_result(convert(f.result()))
            except BaseException as e:
                outer.set_exception(e)

        inner.add_done_callback(done)
        return outer

    def _check_usable(self, call: str) -> None:
        if self._broken is not None:
            raise EnvError(f"environment {self.cls.__name__}: {call}() after a failed call; its trajectory should "
                           f"have ended ({self._broken.message})")
        if self._closed:
            raise EnvError(f"environment {self.cls.__name__}: {call}() after close()")

    def _has(self, name: str) -> bool:
        return callable(getattr(self.cls, name, None))


def failure_counts(runners: list[EnvRunner]) -> dict[str, float]:
    """`env/failures/<kind>` over the runners' failures, every kind present (zeros too)."""
    counts = dict.fromkeys(ENV_FAILURE_KINDS, 0)
    for r in runners:
        for f in r.failures:
            counts[f.kind] += 1
    return {f"env/failures/{k}": float(n) for k, n in counts.items()}


def _is_async_method(cls: type, name: str) -> bool:
    return inspect.iscoroutinefunction(getattr(cls, name, None))


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool) or (getattr(x, "dtype", None) is not None and x.dtype.kind == "b"
                                   and getattr(x, "shape", None) == ())  # numpy / torch scalar bools


def _messages_problem(messages: Any, what: str) -> str | None:
    if not isinstance(messages, (list, tuple)):
        return f"{what} are {_describe(messages)}, not a list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            return f"{what}[{i}] is {_describe(m)}, not a message (a dict with a str 'role' and a 'content')"
    return None


def _describe(x: Any) -> str:
    text = repr(x)
    return f"a {type(x).__name__} {text if len(text) <= 80 else text[:77] + '...'}"
