import asyncio
import math
import sys
import threading
import time
from pathlib import Path

import pytest

from reward.api import FAILURE_KINDS, RewardError, RewardScorer, WeightedReward, load_reward_fn
from rlhf.types import Prompt, Sample, SampleGroup


def groups(texts, charset="0123456789"):
    p = Prompt(index=0, text="Compute 1 plus 1 using only digits:", ids=[1, 2], row={"charset": charset})
    return [SampleGroup(p, [Sample(p, [3], [-0.1], t, False, 0, 0) for t in texts])]


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_load_by_file_path_and_by_import_path(tmp_path, monkeypatch):
    body = "def score(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
    path = write(tmp_path, "mine.py", body)
    by_path = load_reward_fn(f"{path}:score")
    assert by_path(prompts=["p"], completions=["abc"]) == [3.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    by_import = load_reward_fn("mine:score")
    assert by_import(prompts=["p"], completions=["ab"]) == [2.0]
    sys.modules.pop("mine", None)


def test_a_class_is_instantiated_once(tmp_path):
    body = ("class Counter:\n    built = 0\n    def __init__(self):\n        Counter.built += 1\n"
            "    def __call__(self, prompts, completions, **kw):\n"
            "        return [float(Counter.built)] * len(completions)\n")
    fn = load_reward_fn(f"{write(tmp_path, 'cls.py', body)}:Counter")
    assert fn(prompts=["p"], completions=["a"]) == [1.0] and fn(prompts=["p"], completions=["a"]) == [1.0]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", r"must look like 'pkg.module:fn'"),
    ("nowhere/missing.py:fn", r"file .*missing.py does not exist"),
    ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz'"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward_fn(spec)


def test_missing_function_lists_what_the_file_defines(tmp_path):
    path = write(tmp_path, "two.py", "def alpha(**kw): return []\ndef beta(**kw): return []\n")
    with pytest.raises(RewardError, match=r"has no 'gamma' \(it defines \['alpha', 'beta'\]\)"):
        load_reward_fn(f"{path}:gamma")


def test_scorer_passes_columns_and_ids_and_weights_components():
    seen = {}

    def digits(prompts, completions, completion_ids, charset, **kw):
        seen.update(prompts=prompts, ids=completion_ids, charset=charset)
        return [sum(ch in cs for ch in c) / len(c) for c, cs in zip(completions, charset)]

    async def shorter(prompts, completions, **kw):  # async functions work too
        return [1.0 / len(c) for c in completions]

    gs = groups(["12", "1a"])
    scorer = RewardScorer([WeightedReward("digits", digits, 2.0), WeightedReward("f.py:shorter", shorter, 1.0)])
    metrics = scorer.score(gs)
    assert seen["ids"] == [[3], [3]] and seen["charset"] == ["0123456789"] * 2
    assert [s.reward for s in gs[0].samples] == [2 * 1.0 + 0.5, 2 * 0.5 + 0.5]
    assert gs[0].samples[1].reward_components == {"digits": 0.5, "f.py:shorter": 0.5}
    assert metrics == {"reward/digits/mean": 0.75, "reward/shorter/mean": 0.5}


def test_none_means_does_not_apply_but_someone_must_apply():
    half = lambda prompts, completions, **kw: [1.0, None]  # noqa: E731
    gs = groups(["a", "b"])
    quarter = lambda completions, **kw: [0.25, 0.25]  # noqa: E731
    RewardScorer([WeightedReward("half", half), WeightedReward("one", quarter)]).score(gs)
    assert [s.reward for s in gs[0].samples] == [1.25, 0.25]
    with pytest.raises(RewardError, match="no reward function returned a value for sample 1"):
        RewardScorer([WeightedReward("half", half)]).score(groups(["a", "b"]))


@pytest.mark.parametrize("returned, message", [
    ([1.0], r"'bad' returned 1 values for 2 completions"),
    ([1.0, math.nan], r"'bad' returned nan for sample 1 \(prompt .*completion 'b'\); expected a finite float"),
    ([1.0, math.inf], r"returned inf for sample 1"),
    ([True, 1.0], r"returned True for sample 0"),
    (["1", 1.0], r"returned '1' for sample 0"),
    (0.5, r"returned a float; it must return a list of 2 floats"),
])
def test_bad_return_values_stop_with_the_function_and_sample_named(returned, message):
    with pytest.raises(RewardError, match=message):
        RewardScorer([WeightedReward("bad", lambda **kw: returned)]).score(groups(["a", "b"]))


def test_a_column_named_like_an_argument_is_refused():
    gs = groups(["a"])
    gs[0].prompt.row["completions"] = "oops"
    with pytest.raises(RewardError, match="dataset column 'completions' clashes"):
        RewardScorer([WeightedReward("x", lambda **kw: [1.0])]).score(gs)


def test_the_example_reward_is_a_function_of_the_text():
    fn = load_reward_fn("examples/charset/reward.py:charset_reward")
    assert fn(prompts=["p"] * 4, completions=["123", "1 2 a", "", "   "], charset=["0123456789"] * 4) == [
        1.0, 2 / 3, 0.0, 0.0]


# ---- failure policy: every kind, under raise and under penalize ----

FIRST = r"the first is sample 0 \(prompt 'Compute 1 plus 1 using only digits:', completion 'a'\)"


def failing(kind, release=None):
    """A reward function that fails in the given way on groups(["a", "b"])."""
    def fn(completions, **kw):
        if kind == "raised":
            raise ValueError("no answer column")
        if kind == "timeout":
            release.wait(1.0)  # "sleeps" 1 s, or until the test lets it go
            return [5.0, 5.0]
        return {"not_finite": [0.5, math.nan], "wrong_type": ["x", 0.5], "wrong_count": [0.5],
                "not_a_list": 0.5}[kind]
    return fn


@pytest.mark.parametrize("kind, message", [
    ("raised", rf"'bad' raised ValueError: no answer column on a batch of 2 completions; {FIRST} \[raised\]"),
    ("timeout", rf"'bad' did not return within timeout_s=0.2 s on a batch of 2 completions; {FIRST} \[timeout\]"),
    ("not_finite", r"'bad' returned nan for sample 1 \(prompt 'Compute .*', completion 'b'\); "
                   r"expected a finite float \[not_finite\]"),
    ("wrong_type", r"'bad' returned 'x' for sample 0 \(prompt 'Compute .*', completion 'a'\); .* \[wrong_type\]"),
    ("wrong_count", rf"'bad' returned 1 values for 2 completions; {FIRST} \[wrong_count\]"),
    ("not_a_list", rf"'bad' returned a float; it must return a list of 2 floats; {FIRST} \[wrong_type\]"),
])
def test_on_error_raise_names_the_function_the_kind_and_the_sample(kind, message):
    release = threading.Event()
    good = WeightedReward("good", lambda **kw: [1.0, 2.0])
    scorer = RewardScorer([good, WeightedReward("bad", failing(kind, release))], timeout_s=0.2)
    try:
        with pytest.raises(RewardError, match=message) as err:
            scorer.score(groups(["a", "b"]))
    finally:
        release.set()
    assert isinstance(err.value.__cause__, ValueError) == (kind == "raised")


# good returns [1, 2] with weight 1, bad has weight 2 and penalty -1:
#   both samples failed:  [1 + 2 * -1, 2 + 2 * -1]  = [-1, 0]
#   nan for sample 1:     [1 + 2 * 0.5, 2 + 2 * -1] = [2, 0]
#   'x' for sample 0:     [1 + 2 * -1, 2 + 2 * 0.5] = [-1, 3]
@pytest.mark.parametrize("kind, counted_as, rewards, failed, bad_mean", [
    ("raised", "raised", [-1.0, 0.0], 2, math.nan),
    ("timeout", "timeout", [-1.0, 0.0], 2, math.nan),
    ("not_finite", "not_finite", [2.0, 0.0], 1, 0.5),
    ("wrong_type", "wrong_type", [-1.0, 3.0], 1, 0.5),
    ("wrong_count", "wrong_count", [-1.0, 0.0], 2, math.nan),
    ("not_a_list", "wrong_type", [-1.0, 0.0], 2, math.nan),
])
def test_on_error_penalize_gives_the_penalty_and_counts_every_failed_sample(kind, counted_as, rewards, failed,
                                                                            bad_mean):
    release = threading.Event()
    scorer = RewardScorer([WeightedReward("good", lambda **kw: [1.0, 2.0]),
                           WeightedReward("f.py:bad", failing(kind, release), 2.0)],
                          on_error="penalize", penalty=-1.0, timeout_s=0.2)
    gs = groups(["a", "b"])
    t0 = time.perf_counter()
    metrics = scorer.score(gs)
    elapsed = time.perf_counter() - t0
    release.set()  # lets an abandoned call finish; its [5, 5] goes nowhere
    assert elapsed < 0.7  # the timed-out call is not waited for (it would take 1 s)
    assert [s.reward for s in gs[0].samples] == rewards
    assert gs[0].samples[0].reward_components == {"good": 1.0, "f.py:bad": (rewards[0] - 1.0) / 2}
    mean = metrics.pop("reward/bad/mean")
    assert mean == bad_mean or (math.isnan(mean) and math.isnan(bad_mean))
    expected = {"reward/good/mean": 1.5, "reward/good/failures": 0.0, "reward/bad/failures": float(failed)}
    expected.update({f"reward/failures/{k}": float(failed if k == counted_as else 0) for k in FAILURE_KINDS})
    assert metrics == expected


def test_a_penalty_counts_as_a_value_and_none_is_not_a_failure():
    inf_or_none = lambda completions, **kw: [None, math.inf]  # noqa: E731
    with pytest.raises(RewardError, match="no reward function returned a value for sample 0"):
        RewardScorer([WeightedReward("x", inf_or_none)], on_error="penalize").score(groups(["a", "b"]))
    gs = groups(["a", "b"])
    other = lambda completions, **kw: [0.25, None]  # noqa: E731
    metrics = RewardScorer([WeightedReward("x", inf_or_none), WeightedReward("y", other)],
                           on_error="penalize", penalty=-0.5).score(gs)
    assert [s.reward for s in gs[0].samples] == [0.25, -0.5]  # sample 1: only the penalty applies
    assert metrics["reward/x/failures"] == 1.0 and metrics["reward/failures/not_finite"] == 1.0


def test_a_timed_out_call_does_not_starve_the_next_batch():
    release, calls = threading.Event(), []

    def hangs_once(completions, **kw):
        calls.append(1)
        if len(calls) == 1:
            release.wait(1.0)
        return [1.0] * len(completions)

    scorer = RewardScorer([WeightedReward("h", hangs_once)], on_error="penalize", penalty=-1.0,
                          timeout_s=0.2, workers=1)
    try:
        first, second = groups(["a"]), groups(["a"])
        assert scorer.score(first)["reward/failures/timeout"] == 1.0 and first[0].samples[0].reward == -1.0
        # the only worker is still stuck in the first call; a fresh pool runs the second at once
        assert scorer.score(second)["reward/failures/timeout"] == 0.0 and second[0].samples[0].reward == 1.0
    finally:
        release.set()


def test_more_sync_functions_than_workers_queue_and_each_gets_its_own_timeout():
    def slow(completions, **kw):
        time.sleep(0.15)
        return [1.0] * len(completions)

    scorer = RewardScorer([WeightedReward("a", slow), WeightedReward("b", slow)], timeout_s=0.25, workers=1)
    gs = groups(["x"])
    scorer.score(gs)  # b waits 0.15 s for the worker, then runs 0.15 s: past 0.25 s from the start, not its own
    assert gs[0].samples[0].reward == 2.0


# ---- concurrency ----

def sleepy_sync(completions, **kw):
    time.sleep(0.3)
    return [1.0] * len(completions)


async def sleepy_async(completions, **kw):
    await asyncio.sleep(0.3)
    return [1.0] * len(completions)


@pytest.mark.parametrize("fns", [(sleepy_sync, sleepy_sync), (sleepy_async, sleepy_async),
                                 (sleepy_sync, sleepy_async)], ids=["sync", "async", "mixed"])
def test_slow_functions_run_together(fns):
    scorer = RewardScorer([WeightedReward(f"r{k}", fn) for k, fn in enumerate(fns)])
    gs = groups(["a", "b"])
    t0 = time.perf_counter()
    scorer.score(gs)
    assert time.perf_counter() - t0 < 0.55  # one after the other would take 0.6 s
    assert [s.reward for s in gs[0].samples] == [2.0, 2.0]


def test_an_async_function_that_raises_is_a_failure_like_any_other():
    async def broken(completions, **kw):
        await asyncio.sleep(0)
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"'broken' raised KeyError: 'answer' on a batch of 1 completions") as err:
        RewardScorer([WeightedReward("broken", broken)]).score(groups(["a"]))
    assert isinstance(err.value.__cause__, KeyError)
    gs = groups(["a"])
    metrics = RewardScorer([WeightedReward("broken", broken)], on_error="penalize", penalty=-2.0).score(gs)
    assert gs[0].samples[0].reward == -2.0 and metrics["reward/failures/raised"] == 1.0


def test_score_works_inside_a_running_event_loop():
    async def caller():
        gs = groups(["a"])
        RewardScorer([WeightedReward("s", sleepy_async)]).score(gs)
        return gs[0].samples[0].reward

    assert asyncio.run(caller()) == 1.0


def test_class_based_rewards_keep_their_state_across_batches(tmp_path):
    body = ("class Novelty:\n"  # 1.0 the first time a completion is seen, then 0.0
            "    def __init__(self):\n        self.seen = set()\n"
            "    def __call__(self, completions, **kw):\n"
            "        out = [0.0 if c in self.seen else 1.0 for c in completions]\n"
            "        self.seen.update(completions)\n        return out\n"
            "class AsyncLength:\n"
            "    def __init__(self):\n        self.calls = 0\n"
            "    async def __call__(self, completions, **kw):\n"
            "        self.calls += 1\n        return [float(len(c) * self.calls) for c in completions]\n")
    path = write(tmp_path, "stateful.py", body)
    scorer = RewardScorer([WeightedReward("novelty", load_reward_fn(f"{path}:Novelty")),
                           WeightedReward("length", load_reward_fn(f"{path}:AsyncLength"), 0.5)])
    first, second = groups(["a", "bb"]), groups(["a", "c"])
    scorer.score(first)
    scorer.score(second)
    # first: novelty [1, 1], length [1, 2] * 1 call; second: novelty [0, 1], length [1, 1] * 2 calls
    assert [s.reward for s in first[0].samples] == [1.5, 2.0]
    assert [s.reward for s in second[0].samples] == [1.0, 2.0]


# ---- config ----

def test_failure_policy_config_is_validated_and_reaches_the_keys():
    from rlhf.config import ConfigError, load_config

    cfg = load_config("configs/grpo_tiny.yaml", ["reward.on_error=penalize", "reward.penalty=-1", "reward.workers=2"])
    assert (cfg.reward.on_error, cfg.reward.penalty, cfg.reward.timeout_s, cfg.reward.workers) == (
        "penalize", -1.0, 60.0, 2)
    for override, message in [("reward.timeout_s=0", r"reward.timeout_s: must be > 0"),
                              ("reward.workers=0", r"reward.workers: must be > 0"),
                              ("reward.penalty=.nan", r"reward.penalty: must be a finite number"),
                              ("reward.on_error=ignore", r"reward.on_error: 'ignore' is not one of")]:
        with pytest.raises(ConfigError, match=message):
            load_config("configs/grpo_tiny.yaml", [override])


def test_a_reward_that_never_returns_does_not_keep_the_process_alive(tmp_path):
    """Under penalize the stuck call is abandoned after its timeout; the interpreter must still exit."""
    import subprocess

    script = tmp_path / "stuck.py"
    script.write_text(
        "import threading, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from reward.api import RewardScorer, WeightedReward\n"
        "from tests.test_reward_api import groups\n"
        "def stuck(completions, **kw):\n"
        "    threading.Event().wait()  # never returns\n"
        "scorer = RewardScorer([WeightedReward('stuck', stuck), WeightedReward('one', lambda completions, **kw: "
        "[1.0] * len(completions))], on_error='penalize', timeout_s=0.2)\n"
        "print(scorer.score(groups(['a', 'b']))['reward/stuck/failures'])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2.0"
