# Copied from the team's peer benchmark, shared/peer_trl (reward.py), unchanged below this line.
"""Dense, deterministic reward for the peer benchmark, in TRL's reward-function signature.

score = fraction of the completion's non-whitespace characters that belong to the prompt's target character set
(digits for "Compute A plus B using only digits:", the letter X for "Repeat the letter X many times:").
Empty / all-whitespace completions score 0. Range [0, 1].
"""
import re

DIGITS = "0123456789"
_LETTER = re.compile(r"Repeat the letter (\w) ")


def charset_for(prompt: str) -> str:
    m = _LETTER.search(prompt)
    return m.group(1) if m else DIGITS


def score(completion: str, charset: str) -> float:
    chars = [c for c in completion if not c.isspace()]
    if not chars:
        return 0.0
    allowed = set(charset)
    return sum(c in allowed for c in chars) / len(chars)


def _text(x):
    # TRL passes plain strings for standard (non-chat) datasets; accept chat-style lists too.
    if isinstance(x, list):
        return "".join(m.get("content", "") for m in x if isinstance(m, dict))
    return x


def reward(prompts, completions, **kwargs) -> list[float]:
    charsets = kwargs.get("charset") or [charset_for(_text(p)) for p in prompts]
    return [score(_text(c), cs) for c, cs in zip(completions, charsets)]
