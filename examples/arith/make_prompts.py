"""Write prompts.jsonl and eval_prompts.jsonl for the arithmetic task (deterministic):
`python examples/arith/make_prompts.py`.

Each row asks one sum or difference of two numbers up to 20 as a chat question, with the number in
`answer`. The reward is `reward.builtin:math_answer` (the completion's final number against `answer`).
SmolLM2-135M-Instruct answers about half of them right greedily; GRPO lifts that. Held-out questions
are drawn with another seed and never repeat a training question.
"""

import json
import random
from pathlib import Path


def make_rows(seed: int, n: int, exclude: set[str] = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < n:
        a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        prompt = f"What is {a} {op} {b}? Reply with the number only."
        if prompt in exclude or any(r["prompt"] == prompt for r in rows):
            continue
        rows.append({"prompt": prompt, "answer": str(a + b if op == "+" else a - b)})
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    train = make_rows(seed=1, n=512)
    held_out = make_rows(seed=2, n=64, exclude={r["prompt"] for r in train})
    for name, rows in (("prompts.jsonl", train), ("eval_prompts.jsonl", held_out)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
