from fractions import Fraction

import pytest

from reward.api import RewardScorer, WeightedReward, load_reward_fn
from reward.builtin import (
    ExactMatch,
    FormatReward,
    LengthPenalty,
    exact_match,
    final_answer,
    format_reward,
    length_penalty,
    math_answer,
    parse_number,
)
from rlhf.types import Prompt, Sample, SampleGroup

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def math(completion, reference):
    return math_answer(prompts=["q"], completions=[completion], answer=[reference])[0]


# ---- exact_match ----

def test_exact_match_strips_and_optionally_folds_case():
    completions = ["  Paris\n", "paris", "Paris!", "42"]
    answers = ["Paris", "Paris", "Paris", 42]
    assert exact_match(prompts=["q"] * 4, completions=completions, answer=answers) == [1.0, 0.0, 0.0, 1.0]
    folded = ExactMatch(ignore_case=True)
    assert folded(completions=completions, answer=answers) == [1.0, 1.0, 0.0, 1.0]


def test_exact_match_binds_another_column_and_names_a_missing_one():
    assert ExactMatch(column="label")(completions=["yes", "no"], label=["yes", "yes"]) == [1.0, 0.0]
    missing = r"ExactMatch: the dataset has no column 'label' \(its other columns: \['answer'\]\)"
    with pytest.raises(ValueError, match=missing):
        ExactMatch(column="label")(prompts=["q"], completions=["yes"], completion_ids=[[1]], answer=["yes"])


# ---- math_answer ----

@pytest.mark.parametrize("completion, reference, expected", [
    ("She has 1234 stickers.", "work\n#### 1,234", 1.0),          # commas in the reference
    ("It costs $1,234 in total.", "#### 1234", 1.0),              # commas and $ in the completion
    ("He earns $18.00 per hour.", "#### 18", 1.0),                # "$18.00" == 18
    ("The result is 18.5", "#### 18", 0.0),
    ("The temperature drops to -3 degrees.", "#### -3", 1.0),     # negative
    ("The temperature drops 3 degrees.", "#### -3", 0.0),
    ("She ate 3/4 of the pie.", "#### 0.75", 1.0),                # fraction vs decimal, exact
    ("She ate 0.75 of the pie.", "3/4", 1.0),                     # bare-number reference
    ("So 10 + 32 = 42. The answer is 42.", "42", 1.0),            # trailing dot
    ("The answer is 42. Check: 42 - 2 = 40", "#### 42", 1.0),     # "answer is" beats the last number
    ("First 5, then \\boxed{17}, then 99", "#### 17", 1.0),       # \boxed beats everything
    ("\\boxed{\\frac{3}{4}}", "#### 0.75", 1.0),
    ("2 apples plus 3 apples make 5 apples", "#### 5", 1.0),      # multiple numbers -> the last
    ("2 apples plus 3 apples make 5 apples", "#### 3", 0.0),
    ("I computed it.\n#### 72", GSM8K_ANSWER, 1.0),               # a full GSM8K answer cell
    ("42.0", "#### 42", 1.0),
    ("50% of them", "#### 50", 1.0),                              # percent sign stripped
    ("5-3 = 2", "#### 2", 1.0),                                   # "5-3" is subtraction, not -3
    ("I do not know.", "#### 7", 0.0),                            # no number at all -> 0.0, not None
    ("", "#### 0", 0.0),
])
def test_math_answer_hand_computed(completion, reference, expected):
    assert math(completion, reference) == expected


def test_math_answer_prefers_boxed_then_marker_then_answer_is_then_last_number():
    text = "Try 1. The answer is 2. #### 3\n\\boxed{4} and 5"
    assert final_answer(text) == 4
    assert final_answer(text.replace("\\boxed{4}", "")) == 3
    assert final_answer("Try 1. The answer is 2. Then 5") == 2
    assert final_answer("Try 1. Then 5") == 5
    assert final_answer("\\boxed{} so 6") == 6  # a marker with no number falls through


@pytest.mark.parametrize("text, value", [
    ("1,000", Fraction(1000)), ("$18.00", Fraction(18)), ("42.", Fraction(42)), ("-3", Fraction(-3)),
    (" 3 / 4 ", Fraction(3, 4)), ("12.5%", Fraction(25, 2)), ("\\frac{1}{8}", Fraction(1, 8)),
    ("forty", None), ("1/0", None), ("1,23", None), ("3 apples", None),
])
def test_parse_number_whole_string(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("bad", ["#### seventy-two", "no marker and no number", "####", None])
def test_unparseable_reference_raises_naming_the_row(bad):
    with pytest.raises(ValueError, match=r"math_answer: row 1 of the batch \(prompt 'second'\) has answer"):
        math_answer(prompts=["first", "second"], completions=["72", "72"], answer=["#### 72", bad])


def test_math_answer_numeric_reference_cells():
    assert math_answer(completions=["3", "2.5", "2"], answer=[3, 2.5, 2.5]) == [1.0, 1.0, 0.0]


# ---- format_reward ----

def test_format_reward_default_and_custom_patterns():
    completions = ["<think>add them</think> 42", "  <think>\nline\n</think>\n42", "<think></think> 42",
                   "42 <think>late</think> 42", "<think>no answer</think>   "]
    assert format_reward(completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    digits = FormatReward(r"\d+", full_match=True)
    assert digits(completions=["123", "123 apples", ""]) == [1.0, 0.0, 0.0]
    assert FormatReward(r"\d+")(completions=["123 apples", "none"]) == [1.0, 0.0]


# ---- length_penalty ----

def test_length_penalty_is_zero_to_target_then_linear():
    small = LengthPenalty(target_tokens=4, scale=0.5)
    ids = [[1], [1] * 4, [1] * 6, [1] * 12]
    # -0.5 * max(0, L - 4) / 4 for L = 1, 4, 6, 12
    assert small(completions=["a"] * 4, completion_ids=ids) == [0.0, 0.0, -0.25, -1.0]
    # defaults: target 512, scale 1 -> -(768 - 512) / 512 at 768 tokens
    assert length_penalty(completion_ids=[[0] * 512, [0] * 768]) == [0.0, -0.5]


@pytest.mark.parametrize("kwargs, message", [
    ({"target_tokens": 0}, "target_tokens must be > 0"), ({"scale": -1.0}, "scale must be >= 0"),
])
def test_length_penalty_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LengthPenalty(**kwargs)


# ---- through the reward API ----

@pytest.mark.parametrize("name", ["exact_match", "ExactMatch", "math_answer", "format_reward", "FormatReward",
                                  "length_penalty", "LengthPenalty"])
def test_every_builtin_loads_by_import_path(name):
    fn = load_reward_fn(f"reward.builtin:{name}")
    out = fn(prompts=["q"], completions=["<think>x</think> 72"], completion_ids=[[5, 6, 7]], answer=["#### 72"])
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], float)


def test_scorer_accepts_builtin_outputs_and_weights_them():
    p = Prompt(index=0, text="How many clips?", ids=[1, 2], row={"answer": GSM8K_ANSWER})
    texts = ["<think>48 + 24</think> \\boxed{72}", "It is 70.", "<think>guess</think> 72"]
    ids = [[3] * 600, [3] * 10, [3] * 512]
    gs = [SampleGroup(p, [Sample(p, i, [-0.1] * len(i), t, False, 0, 0) for t, i in zip(texts, ids)])]
    scorer = RewardScorer([
        WeightedReward("reward.builtin:math_answer", load_reward_fn("reward.builtin:math_answer"), 1.0),
        WeightedReward("reward.builtin:format_reward", load_reward_fn("reward.builtin:format_reward"), 0.5),
        WeightedReward("reward.builtin:length_penalty", load_reward_fn("reward.builtin:length_penalty"), 0.5),
    ])
    metrics = scorer.score(gs)
    # sample 0: 1 + 0.5 * 1 + 0.5 * -(600 - 512) / 512 = 1.5 - 0.0859375; sample 1: 0; sample 2: 1 + 0.5 + 0
    assert [s.reward for s in gs[0].samples] == [1.4140625, 0.0, 1.5]
    assert gs[0].samples[0].reward_components == {"reward.builtin:math_answer": 1.0,
                                                  "reward.builtin:format_reward": 1.0,
                                                  "reward.builtin:length_penalty": -0.171875}
    assert metrics["reward/math_answer/mean"] == 2 / 3 and metrics["reward/format_reward/mean"] == 2 / 3
