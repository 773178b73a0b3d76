"""Completion ids to text, as vLLM's detokenizer would write them (the engine runs without detokenizing)."""

from __future__ import annotations


def completion_texts(tokenizer, prompt_ids: list[int], completions: list[list[int]]) -> list[str]:
    """The text of each completion, as vLLM's own detokenizer would have written it: a `tokenizers`
    DecodeStream primed with the prompt (so a completion's first word keeps the space the prompt's
    context gives it), special tokens skipped. The engine runs with detokenization off: decoding every
    token (and every log-prob's token) as it is generated cost ~15 % of a tiny model's generation,
    and rewards only need the final text. A slow (Python) tokenizer decodes each completion whole."""
    from tokenizers.decoders import DecodeStream

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    texts = []
    for ids in completions:
        stream, parts = DecodeStream(ids=list(prompt_ids), skip_special_tokens=True), []
        for token in ids:
            try:
                parts.append(stream.step(backend, token) or "")
            except Exception as e:  # noqa: BLE001 - as vLLM: a decode stream broken by invalid UTF-8 restarts
                if "Invalid prefix" not in str(e):
                    raise
                stream = DecodeStream(skip_special_tokens=True)
                parts.append(stream.step(backend, token) or "")
        texts.append("".join(parts))
    return texts
