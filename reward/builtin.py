"""Built-in reward functions, usable by import path or from Python.

    reward:
      functions:
        - fn: reward.builtin:math_answer        # GSM8K-style final-answer check on the `answer` column
        - fn: reward.builtin:format_reward      # <think>...</think> answer
          weight: 0.1
        - fn: reward.builtin:length_penalty     # <= 0 beyond 512 completion tokens
          weight: 0.1

Each follows reward/api.py: keyword lists in, one float per completion out. A YAML entry can only
name a function or a class (a class is built with no arguments), so every class here has useful
defaults and a module-level default instance; bind other settings from Python, e.g.
`ExactMatch(column="label", ignore_case=True)`.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

__all__ = ["ExactMatch", "FormatReward", "LengthPenalty", "exact_match", "final_answer", "format_reward",
           "length_penalty", "math_answer", "parse_number", "reference_answer"]


class ExactMatch:
    """1.0 where the completion equals the row's `column` value, else 0.0; never None.

    Both sides are stripped of surrounding whitespace (a non-string reference is compared as
    `str(value)`), and case-folded when `ignore_case`.
    """

    def __init__(self, column: str = "answer", ignore_case: bool = False):
        self.column = column
        self.ignore_case = ignore_case

    def __call__(self, completions: Sequence[str], **kwargs: Any) -> list[float | None]:
        refs = _column(kwargs, self.column, type(self).__name__)
        return [1.0 if self._norm(c) == self._norm(str(r)) else 0.0 for c, r in zip(completions, refs)]

    def _norm(self, s: str) -> str:
        s = s.strip()
        return s.casefold() if self.ignore_case else s


# ---- math answers (GSM8K) ----

# A number with an optional sign, thousands commas in groups of three, decimals and a "/denominator".
# The minus is a sign only where it cannot be subtraction: "5-3" reads as 5 and 3, "x = -3" as -3.
_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(rf"(?:(?<![\w)\]}}])-)?{_DECIMAL}(?:/{_DECIMAL})?")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FINAL_MARK = re.compile(r"####")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def _normalise(text: str) -> str:
    """Drop what decorates a number but does not change it: $, %, LaTeX escapes and spacing."""
    text = _LATEX_FRAC.sub(r"\1/\2", text).replace("{,}", ",").replace("\u2212", "-")  # U+2212: minus sign
    for junk in ("\\$", "$", "\\%", "%", "\\!"):
        text = text.replace(junk, "")
    return re.sub(r"(?<=\d)\s*/\s*(?=\d)", "/", text)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a string that is one number and nothing else, or None.

    Accepts "$1,234", "18.00", "-3", "3/4", "50%", "\\frac{3}{4}", "42." (trailing dot), with spaces
    anywhere. "1,000" == 1000, "42.0" == 42, "0.75" == "3/4": values are exact fractions.
    """
    s = re.sub(r"\s+", "", _normalise(text)).rstrip(".")
    return _value(s) if _NUMBER.fullmatch(s) else None


def _value(token: str) -> Fraction | None:
    num, _, den = token.replace(",", "").partition("/")
    try:
        return Fraction(num) / Fraction(den) if den else Fraction(num)
    except ZeroDivisionError:
        return None


def _first_number(text: str) -> Fraction | None:
    m = _NUMBER.search(_normalise(text))
    return _value(m.group()) if m else None


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced (so \\boxed{\\frac{3}{4}} works)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return text[i + 1 :]  # unclosed: take the rest


def _after_last(pattern: re.Pattern[str], text: str) -> str | None:
    """The rest of the line after the last match of `pattern`."""
    matches = list(pattern.finditer(text))
    return text[matches[-1].end() :].split("\n", 1)[0] if matches else None


def final_answer(completion: str) -> Fraction | None:
    """The completion's final answer: the first number in the last \\boxed{...}, else after the last
    "####", else after the last "answer is"/"answer:", else the last number anywhere; None if none.
    A marker with no number after it falls through to the next rule."""
    for span in (_last_boxed(completion), _after_last(_FINAL_MARK, completion),
                 _after_last(_ANSWER_IS, completion)):
        if span is not None and (value := _first_number(span)) is not None:
            return value
    numbers = _NUMBER.findall(_normalise(completion))
    return _value(numbers[-1]) if numbers else None


def reference_answer(answer: Any) -> Fraction | None:
    """The reference value of a GSM8K `answer` cell: the number after the last "####" (the whole
    worked solution precedes it), or a bare number (a string, int or float); None if neither."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, numbers.Integral):  # numpy integers too, from a parquet column
        answer = str(int(answer))
    elif isinstance(answer, numbers.Real):
        answer = repr(float(answer))
    if not isinstance(answer, str):
        return None
    _, mark, tail = answer.rpartition("####")
    return parse_number(tail if mark else answer)


def math_answer(completions: Sequence[str], answer: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 where the completion's final answer (see `final_answer`) equals the reference number of
    the row's `answer` column exactly, as fractions; 0.0 otherwise, including when the completion
    holds no number. Never None. Raises ValueError naming the batch row and its prompt when a
    reference cannot be parsed: bad data must not be scored as if the policy were wrong."""
    prompts = kwargs.get("prompts")
    scores: list[float | None] = []
    for i, (completion, ref) in enumerate(zip(completions, answer)):
        expected = reference_answer(ref)
        if expected is None:
            where = f" (prompt {prompts[i][:80]!r})" if prompts is not None else ""
            raise ValueError(f"math_answer: row {i} of the batch{where} has answer {ref!r}, which is neither "
                             f"'<solution> #### <number>' nor a number")
        scores.append(1.0 if final_answer(completion) == expected else 0.0)
    return scores


# ---- format and length ----

THINK_THEN_ANSWER = r"^\s*<think>.+?</think>\s*\S"


class FormatReward:
    """1.0 where `pattern` matches the completion, else 0.0; never None.

    Matching is `re.search` (or `re.fullmatch` with `full_match`) with re.DOTALL, so "." spans
    lines. The default pattern asks for a non-empty <think>...</think> block at the start followed
    by some answer text. (If the chat template already opens the <think> tag in the prompt, the
    completion starts inside it: pass a pattern without the opening tag.)
    """

    def __init__(self, pattern: str = THINK_THEN_ANSWER, full_match: bool = False):
        self.pattern = re.compile(pattern, re.DOTALL)
        self.full_match = full_match

    def __call__(self, completions: Sequence[str], **kwargs: Any) -> list[float | None]:
        match = self.pattern.fullmatch if self.full_match else self.pattern.search
        return [1.0 if match(c) else 0.0 for c in completions]


class LengthPenalty:
    """A penalty <= 0 for completions longer than `target_tokens`; never None. With L the number of
    completion token ids (EOS included when generation stopped on it):

        penalty = -scale * max(0, L - target_tokens) / target_tokens

    so 0 up to the target, falling linearly to -scale at twice the target (and beyond, unbounded).
    """

    def __init__(self, target_tokens: int = 512, scale: float = 1.0):
        if target_tokens <= 0:
            raise ValueError(f"LengthPenalty: target_tokens must be > 0, got {target_tokens}")
        if scale < 0:
            raise ValueError(f"LengthPenalty: scale must be >= 0, got {scale}")
        self.target_tokens = target_tokens
        self.scale = scale

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for ids in completion_ids:
            over = len(ids) - self.target_tokens
            out.append(-self.scale * over / self.target_tokens if over > 0 else 0.0)
        return out


def _column(kwargs: dict[str, Any], column: str, who: str) -> Sequence[Any]:
    if column not in kwargs:
        given = sorted(k for k in kwargs if k not in ("prompts", "completion_ids"))
        raise ValueError(f"{who}: the dataset has no column {column!r} (its other columns: {given})")
    return kwargs[column]


# Default instances, for `fn: reward.builtin:<name>` and for import.
exact_match = ExactMatch()
format_reward = FormatReward()
length_penalty = LengthPenalty()
