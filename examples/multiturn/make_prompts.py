"""Writes prompts.jsonl: the charset task's prompts, each with a second instruction for turn 2 that
asks for the other kind of answer: digits after a letter, a letter (a-h, as in the charset task) after
digits. So turn 2's target is not turn 1's: the model must act on the environment's reply.

    python examples/multiturn/make_prompts.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
LETTERS = "abcdefgh"
DIGITS = "0123456789"


def main() -> None:
    rng = random.Random(7)
    rows = [json.loads(line) for line in (HERE.parent / "charset" / "prompts.jsonl").read_text().splitlines()]
    with open(HERE / "prompts.jsonl", "w") as f:
        for row in rows:
            if row["charset"] == DIGITS:
                letter = rng.choice(LETTERS)
                followup, allowed = f"Now repeat the letter {letter} many times:", letter
            else:
                followup, allowed = "Now write only digits:", DIGITS
            f.write(json.dumps({"prompt": row["prompt"], "charset": row["charset"], "followup": followup,
                                "followup_charset": allowed}) + "\n")


if __name__ == "__main__":
    main()
