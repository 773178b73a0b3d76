"""Token in, token out: a multi-turn trajectory trains on the ids the model sampled, with the loss mask exactly on
them. Hand-built cases: a tool call in the middle, an empty turn, a turn cut by the budget; replies rendered with a
chat template by difference, on the tiny tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rollout.multiturn import ModelTurn, ReplyRenderer, build_trajectory
from rollout.tools import ToolBox

# The tiny tokenizer's own special tokens delimit turns, so <|eos|> is both the template's end of a message and
# the model's stop token, as <|im_end|> is for Qwen.
TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = TEMPLATE
    return tok


def render(tok, messages, generation_prompt):
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                   return_dict=False)


def char_ids(tok, text):
    """The text sampled one character per token: decodes to `text`, but is not how `text` tokenizes."""
    return [tok.convert_tokens_to_ids(tok.tokenize(c)[0]) for c in text]


def test_build_trajectory_by_hand():
    turns = [ModelTurn([10, 11], [-0.5, -0.25], 3, [90, 91, 92]), ModelTurn([12], [-1.0], 4)]
    t = build_trajectory([1, 2], turns, max_total_tokens=100)
    assert t.ids == [1, 2, 10, 11, 90, 91, 92, 12]
    assert t.loss_mask == [0, 0, 1, 1, 0, 0, 0, 1]
    assert t.logprobs == [0.0, 0.0, -0.5, -0.25, 0.0, 0.0, 0.0, -1.0]
    assert t.policy_versions == [-1, -1, 3, 3, -1, -1, -1, 4]
    assert t.prompt_len == 2 and t.turn_spans == [(2, 4), (7, 8)] and not t.truncated


def test_the_renderer_knows_how_the_template_closes_a_turn(tokenizer):
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert ReplyRenderer(tokenizer).closing_ids == [tokenizer.eos_token_id] + newline


def test_a_tool_call_in_the_middle(tokenizer):
    renderer, box = ReplyRenderer(tokenizer), ToolBox([add])
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = render(tokenizer, question, True)
    call_text = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    turn1 = char_ids(tokenizer, call_text) + [tokenizer.eos_token_id]  # sampled: not the text's own tokenization
    assert turn1[:-1] != tokenizer.encode(call_text, add_special_tokens=False)
    text1 = tokenizer.decode(turn1, skip_special_tokens=True)  # what the tools (and an environment) read
    assert text1 == call_text
    results = box.run(text1).result(timeout=5)
    assert [r.content for r in results] == ["5"]
    reply = renderer.reply_ids(turn1, [r.message() for r in results])
    turn2 = tokenizer.encode("It is 5.", add_special_tokens=False) + [tokenizer.eos_token_id]
    turns = [ModelTurn(turn1, [-0.1] * len(turn1), 7, reply), ModelTurn(turn2, [-0.2] * len(turn2), 8)]
    t = build_trajectory(prompt, turns, max_total_tokens=1000)

    assert t.ids == prompt + turn1 + reply + turn2  # the sampled ids, untouched
    p, n1, r, n2 = len(prompt), len(turn1), len(reply), len(turn2)
    assert t.loss_mask == [0] * p + [1] * n1 + [0] * r + [1] * n2
    assert t.logprobs == [0.0] * p + [-0.1] * n1 + [0.0] * r + [-0.2] * n2
    assert t.policy_versions == [-1] * p + [7] * n1 + [-1] * r + [8] * n2
    assert t.turn_spans == [(p, p + n1), (p + n1 + r, p + n1 + r + n2)] and not t.truncated
    # The reply is what the template itself writes between the two assistant turns.
    conversation = question + [{"role": "assistant", "content": call_text},
                               {"role": "tool", "name": "add", "content": "5"},
                               {"role": "assistant", "content": "It is 5."}]
    canonical = prompt + tokenizer.encode(call_text, add_special_tokens=False) + [tokenizer.eos_token_id] + reply \
        + turn2 + tokenizer.encode("\n", add_special_tokens=False)
    assert canonical == render(tokenizer, conversation, False)


@pytest.mark.parametrize("stop", [False, True], ids=["no-tokens", "stop-token-only"])
def test_an_empty_model_turn(tokenizer, stop):
    renderer = ReplyRenderer(tokenizer)
    eos = tokenizer.eos_token_id
    prompt = render(tokenizer, [{"role": "user", "content": "Hi"}], True)
    empty = [eos] if stop else []
    reply = renderer.reply_ids(empty, [{"role": "user", "content": "Say something."}])
    # A turn that did not end with the stop token gets the template's whole close, stop token included (mask 0).
    assert reply[0] == (tokenizer.encode("\n", add_special_tokens=False)[0] if stop else eos)
    answer = tokenizer.encode("ok", add_special_tokens=False) + [eos]
    turns = [ModelTurn(empty, [-0.3] * len(empty), 1, reply), ModelTurn(answer, [-0.4] * len(answer), 1)]
    t = build_trajectory(prompt, turns, max_total_tokens=1000)
    assert t.ids == prompt + empty + reply + answer
    assert sum(t.loss_mask) == len(empty) + len(answer)
    assert t.loss_mask == [0] * len(prompt) + [1] * len(empty) + [0] * len(reply) + [1] * len(answer)
    assert t.turn_spans[0] == (len(prompt), len(prompt) + len(empty))
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                    {"role": "user", "content": "Say something."}]
    assert prompt + empty + reply == render(tokenizer, conversation, True)


def test_a_turn_cut_by_the_budget(tokenizer):
    renderer = ReplyRenderer(tokenizer)
    prompt = render(tokenizer, [{"role": "user", "content": "Count."}], True)
    turn1 = tokenizer.encode("1 2 3", add_special_tokens=False) + [tokenizer.eos_token_id]
    reply = renderer.reply_ids(turn1, [{"role": "user", "content": "More."}])
    turn2 = tokenizer.encode("4 5 6 7 8 9", add_special_tokens=False)
    budget = len(prompt) + len(turn1) + len(reply) + 3
    turns = [ModelTurn(turn1, [-0.1] * len(turn1), 0, reply), ModelTurn(turn2, [-0.2] * len(turn2), 1)]
    t = build_trajectory(prompt, turns, max_total_tokens=budget)
    assert t.truncated and len(t.ids) == budget and t.ids == prompt + turn1 + reply + turn2[:3]
    assert t.loss_mask[-3:] == [1, 1, 1] and t.logprobs[-3:] == [-0.2] * 3 and t.policy_versions[-3:] == [1] * 3
    assert t.turn_spans[-1] == (budget - 3, budget)

    inside_reply = len(prompt) + len(turn1) + 2  # the budget ends inside the reply: no later model token
    t = build_trajectory(prompt, turns, max_total_tokens=inside_reply)
    assert t.truncated and t.ids == prompt + turn1 + reply[:2] and len(t.turn_spans) == 1
    assert sum(t.loss_mask) == len(turn1)

    exact = build_trajectory(prompt, turns, max_total_tokens=len(prompt) + len(turn1) + len(reply) + len(turn2))
    assert not exact.truncated


def test_bad_inputs_are_named(tokenizer):
    with pytest.raises(ValueError, match="the prompt has 3 tokens, more than max_total_tokens=2"):
        build_trajectory([1, 2, 3], [], max_total_tokens=2)
    with pytest.raises(ValueError, match="turn 1: 2 ids but 1 log-probs"):
        build_trajectory([1], [ModelTurn([2], [-0.1], 0), ModelTurn([3, 4], [-0.1], 0)], max_total_tokens=10)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}LAST{% endif %}{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(ValueError, match="replies cannot be rendered"):
        ReplyRenderer(tok).reply_ids([1], [{"role": "user", "content": "x"}])
