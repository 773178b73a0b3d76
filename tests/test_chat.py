"""Chat prompts: string prompts as a user message, message lists as they are, an optional system prompt,
ids equal to what the tokenizer's own template renders; over-long chat prompts skipped and counted;
held-out prompts rendered like the training ones. On the tiny tokenizer (given a ChatML template) and
on the real SmolLM2 tokenizer, whose template adds a default system prompt of its own."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from rlhf.config import ConfigError, DataConfig, load_config
from rlhf.data import PromptLoader, load_prompt_dataset
from tests.conftest import REPO

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ROWS = [{"prompt": "What is 2 + 3?"},
        {"prompt": [{"role": "user", "content": "Name a colour."}]},
        {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky?"}]}]


@pytest.fixture(params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def chat_tokenizer(request):
    if request.param == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("tiny_model"))
        tokenizer.chat_template = CHATML
        return tokenizer
    return AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2"))


def _loader(tmp_path, tokenizer, rows, **cfg) -> PromptLoader:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(path=str(path), apply_chat_template=True, **{"max_prompt_tokens": 1024, **cfg})
    return PromptLoader(load_prompt_dataset(data), tokenizer, data, seed=0)


def _rendered(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize("system", ["", "You are terse."])
def test_prompts_are_rendered_as_the_tokenizer_renders_their_messages(tmp_path, chat_tokenizer, system):
    prompts = _loader(tmp_path, chat_tokenizer, ROWS, system_prompt=system).next_batch(3)
    sys_message = [{"role": "system", "content": system}] if system else []
    expected = [sys_message + [{"role": "user", "content": "What is 2 + 3?"}],
                sys_message + [{"role": "user", "content": "Name a colour."}],
                ROWS[2]["prompt"]]  # its own system message stays; the configured one is not added
    for prompt, messages in zip(prompts, expected):
        assert prompt.ids == _rendered(chat_tokenizer, messages)
        assert all(isinstance(i, int) for i in prompt.ids)
        assert prompt.text == chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=False)
    if system:
        assert system in prompts[0].text and "Answer in one word." in prompts[2].text
        assert system not in prompts[2].text


def test_an_over_long_chat_prompt_is_skipped_and_counted(tmp_path, chat_tokenizer):
    rows = [{"prompt": "short"}, {"prompt": "long " * 300}, {"prompt": "also short"}]
    limit = len(_rendered(chat_tokenizer, [{"role": "user", "content": "also short"}]))
    loader = _loader(tmp_path, chat_tokenizer, rows, max_prompt_tokens=limit)
    assert [p.index for p in loader.next_batch(2)] == [0, 2] and loader.skipped_too_long == 1


def test_bad_chat_rows_and_templateless_tokenizers_are_named(tmp_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ConfigError, match="has no chat template"):
        _loader(tmp_path, tokenizer, ROWS).next_batch(1)
    tokenizer.chat_template = CHATML
    with pytest.raises(ConfigError, match="row 0's prompt is neither a string nor a list of messages"):
        _loader(tmp_path, tokenizer, [{"prompt": [{"content": "no role"}]}]).next_batch(1)


def test_eval_prompts_are_rendered_like_training_prompts_unless_the_eval_config_says_otherwise():
    base = ["data.apply_chat_template=true", "data.system_prompt=Be brief.", "data.max_prompt_tokens=64"]
    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", base)
    assert cfg.eval.data.apply_chat_template and cfg.eval.data.system_prompt == "Be brief."
    assert cfg.eval.data.max_prompt_tokens == 64 and cfg.eval.data.path.endswith("eval_prompts.jsonl")
    own = load_config(REPO / "configs" / "grpo_tiny.yaml", [*base, "eval.data.apply_chat_template=false"])
    assert not own.eval.data.apply_chat_template and own.eval.data.system_prompt == "Be brief."
    assert not load_config(REPO / "configs" / "grpo_tiny.yaml").eval.data.apply_chat_template
