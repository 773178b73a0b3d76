"""Write prompts.jsonl and eval_prompts.jsonl for the charset task (deterministic):
`python examples/charset/make_prompts.py`.

Two kinds of prompt alternate: "Compute A plus B using only digits:" (allowed characters: digits)
and "Repeat the letter X many times:" (allowed: X). The reward (reward.py) is the fraction of the
completion's non-space characters that are allowed: a random-init model scores ~0.05, and GRPO
teaches it to emit digits within a few dozen steps.
"""

import json
import random
from pathlib import Path


def make_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            rows.append({"prompt": f"Compute {a} plus {b} using only digits:", "charset": "0123456789",
                         "target": str(a + b), "kind": "sum"})
        else:
            c = rng.choice("abcdefgh")
            rows.append({"prompt": f"Repeat the letter {c} many times:", "charset": c, "target": c * 8,
                         "kind": "repeat"})
    return rows


# Training prompts, and a separately drawn evaluation set (the 8 "repeat" prompts recur in both:
# there are only 8 letters; the sums mostly differ).
for name, seed, n in (("prompts.jsonl", 1234, 512), ("eval_prompts.jsonl", 99, 64)):
    out = Path(__file__).with_name(name)
    rows = make_rows(seed, n)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {out}")
