"""The charset task's reward, a user reward file given by path in configs/grpo_tiny.yaml:

    reward:
      functions:
        - fn: examples/charset/reward.py:charset_reward
"""


def charset_reward(prompts, completions, charset, **kwargs):
    """Fraction of each completion's non-space characters that are in its row's `charset` (0 if empty)."""
    scores = []
    for completion, allowed in zip(completions, charset):
        chars = [c for c in completion if not c.isspace()]
        scores.append(sum(c in allowed for c in chars) / len(chars) if chars else 0.0)
    return scores
