"""One multi-turn trajectory as one token sequence, with the loss on the model's own tokens only.

A trajectory is: the prompt ids, the ids the model sampled in turn 1, the ids of the environment's
or tools' reply, the model's ids of turn 2, ... The model's ids are used exactly as sampled: they
are never decoded and re-tokenized (decoding them for the environment to read is fine; training
on a re-tokenization would train on ids the policy did not sample, and their log-probs would not
be the generator's).

Replies are rendered with the tokenizer's chat template by the delta trick (`ReplyRenderer`):
render a fixed stand-in conversation [user, assistant] with and without the new messages appended
(the longer one with the generation prompt for the next assistant turn) and take the suffix ids.
The stand-in, not the real conversation, is rendered because the real one would need the model's
text decoded (and some templates rewrite earlier assistant turns, so a prefix of the real
conversation does not render as a prefix). What the template writes after an assistant message's
content (`closing_ids`, e.g. "<|im_end|>" "\\n") goes before the reply: the model's turn usually
ends with the first of those (its stop token), so only the rest is added; a turn that did not end
with it (cut by its own token limit, or empty) gets all of it. A template whose renderings are not
prefixes of each other cannot be used this way and is refused with a clear error. A template that
numbers turns or depends on the real earlier messages renders the reply as if after the stand-in.

`build_trajectory` is pure on ids: it lays the turns end to end, marks model tokens, and cuts the
sequence at the token budget (`max_total_tokens`, marking it truncated). All per-token fields are
aligned with `ids` ([T]); rlhf.types.collate's convention (column t-1 scores token t) is the
trainer's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_STAND_IN = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]


@dataclass(frozen=True)
class ModelTurn:
    ids: list[int]  # [n] the token ids the model sampled in this turn, as the engine returned them
    logprobs: list[float]  # [n] the generator's log-prob of each
    policy_version: int  # of the weights that generated this turn
    reply_ids: list[int] = field(default_factory=list)  # [m] environment/tool tokens after the turn ([] after the last)


@dataclass(frozen=True)
class Trajectory:
    ids: list[int]  # [T] prompt, then each turn's model tokens and reply tokens
    loss_mask: list[int]  # [T] 1 exactly on the model's tokens
    logprobs: list[float]  # [T] the generator's log-probs on model tokens, 0.0 elsewhere
    policy_versions: list[int]  # [T] the policy version of each model token's turn, -1 elsewhere
    prompt_len: int  # P: ids[:P] is the prompt
    turn_spans: list[tuple[int, int]]  # [turns kept] [start, end) of each model turn's tokens in ids
    truncated: bool  # cut by max_total_tokens


def build_trajectory(prompt_ids: Sequence[int], turns: Sequence[ModelTurn], max_total_tokens: int) -> Trajectory:
    """The turns laid end to end after the prompt, cut to the first max_total_tokens ids.

    A turn cut by the budget keeps its first tokens (and their log-probs); nothing after the cut is
    kept; a reply cut by it keeps its first tokens (mask 0). An empty turn (no ids) adds no model token.
    """
    if len(prompt_ids) > max_total_tokens:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than max_total_tokens={max_total_tokens}")
    ids, mask, logprobs, versions = list(prompt_ids), [0] * len(prompt_ids), [0.0] * len(prompt_ids), \
        [-1] * len(prompt_ids)
    spans: list[tuple[int, int]] = []
    truncated = False
    for k, turn in enumerate(turns):
        if len(turn.ids) != len(turn.logprobs):
            raise ValueError(f"turn {k}: {len(turn.ids)} ids but {len(turn.logprobs)} log-probs")
        room = max_total_tokens - len(ids)
        if room <= 0 and (turn.ids or turn.reply_ids):
            truncated = True
            break
        n = min(len(turn.ids), room)
        spans.append((len(ids), len(ids) + n))
        ids += turn.ids[:n]
        mask += [1] * n
        logprobs += [float(x) for x in turn.logprobs[:n]]
        versions += [turn.policy_version] * n
        if n < len(turn.ids):
            truncated = True
            break
        m = min(len(turn.reply_ids), max_total_tokens - len(ids))
        ids += turn.reply_ids[:m]
        mask += [0] * m
        logprobs += [0.0] * m
        versions += [-1] * m
        if m < len(turn.reply_ids):
            truncated = True
            break
    return Trajectory(ids, mask, logprobs, versions, len(prompt_ids), spans, truncated)


class ReplyRenderer:
    """Renders the messages that answer a model turn as the ids to append after that turn's ids."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None = None):
        self.tokenizer = tokenizer
        self.tools = tools
        user_prompt = self._render(_STAND_IN[:1], True)
        self._base = self._render(_STAND_IN, False)
        if self._base[: len(user_prompt)] != user_prompt:
            raise ValueError("the chat template renders an assistant message differently from its generation prompt; "
                             "replies cannot be rendered as suffixes")
        content = list(tokenizer.encode(_STAND_IN[1]["content"], add_special_tokens=False))
        assistant = self._base[len(user_prompt):]
        if assistant[: len(content)] != content:
            raise ValueError(f"the chat template does not render an assistant message's content as its own tokens "
                             f"({assistant} does not start with {content})")
        self.closing_ids: list[int] = assistant[len(content):]  # e.g. <|im_end|> "\n"

    def reply_ids(self, model_ids: Sequence[int], messages: list[dict]) -> list[int]:
        """The template's close of the model's turn (minus the stop token it sampled), then `messages`, then the
        generation prompt of the next assistant turn."""
        full = self._render(_STAND_IN + messages, True)
        if full[: len(self._base)] != self._base:
            raise ValueError(f"the chat template does not render {[m.get('role') for m in messages]} messages as a "
                             f"suffix of the conversation before them; replies cannot be rendered by difference")
        closing = self.closing_ids
        if model_ids and closing and model_ids[-1] == closing[0]:
            closing = closing[1:]
        return list(closing) + full[len(self._base):]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids of a conversation with the next assistant turn opened (and the tools' schemas, if any)."""
        return self._render(messages, True)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=True, return_dict=False,
                                                 add_generation_prompt=add_generation_prompt)
        if hasattr(out, "keys"):  # a BatchEncoding from tokenizers that ignore return_dict
            out = out["input_ids"]
        return [int(i) for i in out]
