import math
import sys

import pytest

from reward.api import RewardError, RewardScorer, WeightedReward, load_reward_fn
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
