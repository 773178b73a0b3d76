"""A two-turn toy environment on the charset task, for multi-turn GRPO on the tiny model:

    user:      <the dataset's prompt>            (e.g. "Repeat the letter b many times:")
    assistant: <turn 1>                          scored by the row's `charset`
    user:      <the row's `followup`>            (e.g. "Now use only the letter q:")
    assistant: <turn 2>                          scored by the row's `followup_charset`

Each turn's reward is the share of its non-space characters in the allowed set, halved, so the
trajectory's reward (env.reward: sum) is in [0, 1]. The second turn is only rewarded for following
an instruction the model reads in the environment's reply, so the rise of the reward over training
shows the model acting on what the environment said.

Configured as `env.cls: examples/multiturn/env.py:CharsetDialogue`; the constructor takes the row's
columns by name.
"""


def share_in(text: str, allowed: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c in allowed for c in chars) / len(chars) if chars else 0.0


class CharsetDialogue:
    def __init__(self, charset: str, followup: str, followup_charset: str):
        self.charsets = [charset, followup_charset]
        self.followup = followup
        self.turn = 0

    def init(self, prompt_messages):
        return prompt_messages, {}

    def step(self, action_text: str) -> dict:
        reward = share_in(action_text, self.charsets[self.turn]) / 2
        self.turn += 1
        done = self.turn == 2
        observations = [] if done else [{"role": "user", "content": self.followup}]
        return {"observations": observations, "reward": reward, "done": done, "metadata": {"turn": self.turn}}
