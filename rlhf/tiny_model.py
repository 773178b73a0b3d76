"""Build a tiny random-init HF causal LM (Qwen2 layout) and a BPE tokenizer trained locally.

    python -m rlhf.tiny_model --out .cache/tiny-model [--corpus examples/charset/prompts.jsonl]

The tokenizer is a byte-level BPE trained with `tokenizers` on the string columns of the corpus
(plus a fixed alphabet of digits, letters and punctuation), so nothing is downloaded. Heads are
64 wide: vLLM's CPU attention needs head size >= 64. Loadable by transformers and by vLLM.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

SIZES = {  # Qwen2 shapes; "tiny" has ~3.7M parameters with a 1000-token vocabulary
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=4),
}
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]
# With --chat: a chat template on the tokenizer's own special tokens. <|eos|> ends every message, so it
# is both the template's end of a turn and the model's stop token (as <|im_end|> is for Qwen and SmolLM2).
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def corpus_texts(corpus: Path | None) -> list[str]:
    texts = [string.ascii_letters + string.digits + string.punctuation, " ".join(string.digits),
             " ".join(string.ascii_lowercase)]
    if corpus is not None:
        for line in corpus.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                texts.append(" ".join(str(v) for v in row.values() if isinstance(v, (str, int, float))))
    return texts


def build(out: Path, corpus: Path | None = None, size: str = "tiny", vocab_size: int = 1000, seed: int = 1234,
          max_position_embeddings: int = 1024, tie_word_embeddings: bool = False, chat: bool = False) -> dict:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus_texts(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|bos|>",
                                        eos_token="<|eos|>", model_max_length=max_position_embeddings)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), head_dim=64, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=tie_word_embeddings, use_sliding_window=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SIZES[size])
    model = Qwen2ForCausalLM(config).float()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    info = {"path": str(out), "size": size, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "tie_word_embeddings": tie_word_embeddings, "chat_template": chat}
    (out / "tiny_model.json").write_text(json.dumps(info, indent=1))
    return info


def build_reward_model(out: Path, corpus: Path | None = None, seed: int = 4321) -> dict:
    """A tiny random-init Qwen2 reward model (sequence classification, one output) with the same
    kind of locally trained tokenizer: for tests of the reward-model scorer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    info = build(out, corpus, size="tiny", seed=seed)  # writes the tokenizer (and a causal LM, replaced below)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), head_dim=64, max_position_embeddings=1024, num_labels=1,
                         use_sliding_window=False, pad_token_id=tokenizer.pad_token_id, **SIZES["tiny"])
    Qwen2ForSequenceClassification(config).float().save_pretrained(out, safe_serialization=True)
    return {**info, "kind": "reward_model"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rlhf.tiny_model", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="directory to write the model and tokenizer to")
    ap.add_argument("--corpus", type=Path, help="a .jsonl file whose string columns train the tokenizer")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tie", action="store_true", help="tie the output layer to the input embedding (as most "
                    "small instruct models do)")
    ap.add_argument("--chat", action="store_true", help="give the tokenizer a chat template (multi-turn rollouts "
                    "need one)")
    ap.add_argument("--reward-model", action="store_true", help="a sequence-classification reward model instead")
    args = ap.parse_args(argv)
    if args.reward_model:
        print(json.dumps(build_reward_model(args.out, args.corpus, args.seed)))
    else:
        print(json.dumps(build(args.out, args.corpus, args.size, args.vocab_size, args.seed,
                                    tie_word_embeddings=args.tie, chat=args.chat)))


if __name__ == "__main__":
    main()
