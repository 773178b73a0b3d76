# Copied from the team's peer benchmark, shared/peer_trl (make_task.py), unchanged below this line.
"""Build the peer-benchmark task deterministically: a tiny random-init Qwen2 causal LM with a locally trained
byte-level BPE tokenizer (~1000 tokens), plus 512 prompts. Nothing is downloaded.

usage: python make_task.py OUT_DIR [SIZE]     SIZE: tiny (default, 3.7M params) or 50m (~50M params)
  -> OUT_DIR/model/          (config.json, generation_config.json, model.safetensors, tokenizer files)
     OUT_DIR/prompts.jsonl   (512 rows: prompt, target, charset, kind)
     OUT_DIR/task_info.json  (sizes + sha256 of the produced files, to check reproducibility)
"""
import hashlib
import json
import os
import random
import sys

SEED = 1234
VOCAB = 1000
N_PROMPTS = 512
MAX_PROMPT_TOKENS = 64
LETTERS = "abcdefgh"  # letters used by the "repeat the letter X" prompts
DIGITS = "0123456789"
FILLER = ("the a of and to in is you that it he was for on are as with his they at be this have from "
          "write only number letter many times plus minus answer using digits repeat compute please now").split()


def sums(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"Compute {a} plus {b} using only digits:", str(a + b), DIGITS, "sum"


def repeat(rng):
    c = rng.choice(LETTERS)
    return f"Repeat the letter {c} many times:", c * 8, c, "repeat"


def pseudo_words(rng, n=600):
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    return ["".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def build_corpus(rng):
    corpus = []
    words = FILLER + pseudo_words(rng)
    for _ in range(3000):
        p, t, _, _ = sums(rng)
        corpus.append(f"{p} {t}")
        p, t, _, _ = repeat(rng)
        corpus.append(f"{p} {' '.join(t)} {t}")
        corpus.append(" ".join(rng.choice(words) for _ in range(10)))
    return corpus


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


# Model shapes by size; both keep head_dim 64 (vLLM's CPU attention needs >= 64).
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "50m": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=4),
}


def main():
    out = sys.argv[1]
    size = sys.argv[2] if len(sys.argv) > 2 else "tiny"
    if size not in SIZES:
        sys.exit(f"unknown SIZE {size!r}; choose one of {sorted(SIZES)}")
    mdir = os.path.join(out, "model")
    os.makedirs(mdir, exist_ok=True)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    # --- tokenizer: byte-level BPE trained on a synthetic corpus built from the task's own vocabulary ---
    rng = random.Random(SEED)
    corpus = build_corpus(rng)
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                     eos_token="<|eos|>", unk_token=None, model_max_length=512)
    hf_tok.save_pretrained(mdir)
    V = len(hf_tok)

    # --- model: random init, fp32, fixed seed ---
    torch.manual_seed(SEED)
    cfg = Qwen2Config(vocab_size=V, **SIZES[size], head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                                               pad_token_id=hf_tok.pad_token_id)
    model.save_pretrained(mdir, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())

    # --- prompts: half arithmetic ("digits only"), half "repeat the letter X" ---
    prng = random.Random(SEED + 1)
    rows = []
    for i in range(N_PROMPTS):
        p, t, cs, kind = (sums if i % 2 == 0 else repeat)(prng)
        n_tok = len(hf_tok(p)["input_ids"])
        assert n_tok <= MAX_PROMPT_TOKENS, (p, n_tok)
        rows.append({"prompt": p, "target": t, "charset": cs, "kind": kind})
    ppath = os.path.join(out, "prompts.jsonl")
    with open(ppath, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    lens = [len(hf_tok(r["prompt"])["input_ids"]) for r in rows]
    info = {"vocab_size": V, "n_params": n_params, "n_prompts": len(rows), "prompt_tokens_max": max(lens),
            "prompt_tokens_mean": sum(lens) / len(lens),
            "sha256": {fn: sha(os.path.join(mdir, fn)) for fn in sorted(os.listdir(mdir))}}
    info["sha256"]["prompts.jsonl"] = sha(ppath)
    with open(os.path.join(out, "task_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k != "sha256"}))


if __name__ == "__main__":
    main()
