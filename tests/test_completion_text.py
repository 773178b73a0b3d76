"""The generator decodes completions itself (vLLM runs with detokenize=False): the text must be what
vLLM's detokenizer would have produced, i.e. decoded in the prompt's context, special tokens skipped."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rollout.decode import completion_texts


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Words with a leading "▁" for the space before them (Llama/Mistral style); decoding drops the
    space of the text's first word."""
    vocab = {"<unk>": 0, "</s>": 1, "▁Say": 2, "▁hi": 3, "▁there": 4, "!": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def byte_level() -> PreTrainedTokenizerFast:
    vocab = {"<|eos|>": 0, **{c: i + 1 for i, c in enumerate("Sayhi!tr\u0120")}}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def test_first_word_keeps_the_space_the_prompt_gives_it():
    tok = sentencepiece_like()
    say, hi, there, bang, eos = 2, 3, 4, 5, 1
    # Alone, "▁hi ▁there" decodes to "hi there"; after the prompt "Say" it reads " hi there".
    assert tok.decode([hi, there]) == "hi there"
    assert completion_texts(tok, [say], [[hi, there, bang], [there]]) == [" hi there!", " there"]
    assert completion_texts(tok, [say], [[hi, eos]]) == [" hi"]  # EOS is skipped, as vLLM skips special tokens
    assert completion_texts(tok, [say], [[]]) == [""]


def test_byte_level_text_is_the_decoded_completion():
    tok = byte_level()
    ids = tok("Say hi!", add_special_tokens=False)["input_ids"]
    prompt, completion = ids[:3], ids[3:]  # "Say" | " hi!"
    assert completion_texts(tok, prompt, [completion, completion + [0]]) == [" hi!", " hi!"]


def test_a_python_tokenizer_decodes_each_completion_whole():
    class Slow:  # no Rust backend (`_tokenizer`)
        def decode(self, ids, skip_special_tokens):
            assert skip_special_tokens
            return "|".join(map(str, ids))

    assert completion_texts(Slow(), [7], [[1, 2], [3]]) == ["1|2", "3"]
