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
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.types import SampleGroup


class RewardError(RuntimeError):
    """A reward function could not be loaded, or returned something that is not a reward."""


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """`pkg.module:name` or `path/to/file.py:name` -> the callable (a class is instantiated once)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardError(f"reward function {spec!r} must look like 'pkg.module:fn' or 'path/to/file.py:fn'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target), spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward function {spec!r}: cannot import module {target!r}: {e}") from e
    if not hasattr(module, name):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardError(f"reward function {spec!r}: {target} has no {name!r} (it defines {defined})")
    fn = getattr(module, name)
    if inspect.isclass(fn):
        fn = fn()  # a reward with state (a loaded verifier, a compiled regex table) is set up once
    if not callable(fn):
        raise RewardError(f"reward function {spec!r} is a {type(fn).__name__}, not a callable")
    return fn


def _import_file(path: Path, spec: str) -> Any:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: file {path} does not exist")
    # A stable, unique module name per file, so two files named reward.py do not collide.
    mod_name = "rlhf_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
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
        raise RewardError(f"reward function {spec!r}: importing {path} failed: {e!r}") from e
    return module


@dataclass(frozen=True)
class WeightedReward:
    name: str  # as configured, used in metric names and errors
    fn: Callable[..., Any]
    weight: float = 1.0


class RewardScorer:
    """Calls every reward function on a batch of groups and writes each sample's weighted reward.

    The total is sum_k weight_k * r_k over the functions that returned a value for the sample; a
    sample that no function applies to is an error (it would otherwise train on a made-up 0).
    """

    def __init__(self, rewards: list[WeightedReward]):
        if not rewards:
            raise RewardError("no reward functions configured")
        self.rewards = rewards

    def score(self, groups: list[SampleGroup]) -> dict[str, float]:
        samples = [s for g in groups for s in g.samples]
        kwargs = _reward_kwargs(samples)
        totals = [0.0] * len(samples)
        applied = [False] * len(samples)
        metrics: dict[str, float] = {}
        for r in self.rewards:
            values = _check(r.name, _call(r.fn, kwargs), samples)
            for i, v in enumerate(values):
                if v is None:
                    continue
                totals[i] += r.weight * v
                applied[i] = True
                samples[i].reward_components[r.name] = v
            given = [v for v in values if v is not None]
            metrics[f"reward/{_short(r.name)}/mean"] = sum(given) / len(given) if given else math.nan
        for i, s in enumerate(samples):
            if not applied[i]:
                raise RewardError(f"no reward function returned a value for sample {i} "
                                  f"(prompt {s.prompt.text!r}, completion {s.text[:80]!r})")
            s.reward = totals[i]
        return metrics


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


def _call(fn: Callable[..., Any], kwargs: dict[str, list]) -> Any:
    out = fn(**kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


async def _await(x: Any) -> Any:
    return await x


def _check(name: str, values: Any, samples: list) -> list[float | None]:
    if hasattr(values, "tolist"):  # numpy array or torch tensor
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward function {name!r} returned a {type(values).__name__}; "
                          f"it must return a list of {len(samples)} floats")
    if len(values) != len(samples):
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {len(samples)} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            s = samples[i]
            raise RewardError(f"reward function {name!r} returned {v!r} for sample {i} "
                              f"(prompt {s.prompt.text!r}, completion {s.text[:80]!r}); expected a finite float")
        out.append(float(v))
    return out


def _short(name: str) -> str:
    return name.rpartition(":")[2]
