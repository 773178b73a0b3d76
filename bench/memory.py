"""Peak memory of one training step: activation checkpointing and ZeRO-Offload on and off, at two
sequence lengths, measured and compared with the plan's estimate (rlhf/plan.py).

    python bench/memory.py [--size small|tiny] [--seqs 128,512] [--micro-batch 8]

Each configuration runs in a fresh subprocess (peak RSS only grows): a one-rank DeepSpeed engine
(ZeRO-3, gloo, torch AdamW, fp32) built by the trainer's own code (actors/deepspeed_rank.py's
deepspeed_config and gradient-checkpointing switch) around the Qwen2 model of rlhf-tiny-model
("small": ~50M parameters), then one forward, backward and optimizer step on a micro-batch of random
tokens at the given length. Measured: the process's peak RSS during model build and step minus its
RSS before the model was built (the runtime). Estimated: the plan's parameters + gradients + Adam
states + activations for the same config. On CPU "offload" moves tensors to where they already are,
so it cannot lower the peak; the rows show what it costs instead.
Prints a table and the ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def overrides(model: Path, seq: int, micro: int, ckpt: bool, offload: bool) -> list[str]:
    return [f"model.path={model}", f"data.path={REPO / 'examples/charset/prompts.jsonl'}",
            f"reward.functions.0.fn={REPO / 'examples/charset/reward.py'}:charset_reward",
            f"data.max_prompt_tokens={seq // 2}", f"rollout.max_new_tokens={seq - seq // 2}",
            f"rollout.max_model_len={max(seq, 512)}", f"train.micro_batch_size={micro}",
            f"train.mini_batch_size={micro}", f"rollout.prompts_per_step={micro}", "rollout.samples_per_prompt=1",
            "train.zero_stage=3", f"train.gradient_checkpointing={ckpt}", f"train.offload_optimizer={offload}",
            f"train.offload_params={offload}", "train.threads=2", "logging.wandb=disabled"]


def one(args: argparse.Namespace) -> None:
    """In the subprocess: build, step once, print the measurement as JSON."""
    import torch

    from actors.deepspeed_rank import DeepSpeedRank
    from rlhf.algorithms import token_logprobs
    from rlhf.config import load_config
    from rlhf.plan import ModelShape, trainer_memory
    from weight_sync.group import free_port

    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", overrides(args.model, args.seq, args.micro, args.ckpt,
                                                                      args.offload))
    rank = DeepSpeedRank(cfg, 0, 1, "cpu")
    import deepspeed  # noqa: F401  (imported before the baseline: it is runtime, not the step)
    from transformers import AutoModelForCausalLM

    base = rss_gib()
    t0 = time.perf_counter()
    rank._start_engine("127.0.0.1", free_port("127.0.0.1"), lambda: AutoModelForCausalLM.from_pretrained(
        str(args.model), dtype=torch.float32), cfg.train.lr)
    engine = rank.engine
    engine.train()
    marks = {"built": (rss_gib() - base, peak_gib() - base)}
    ids = torch.randint(0, engine.module.config.vocab_size, (args.micro, args.seq))
    logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
    loss = -token_logprobs(logits, ids[:, 1:], 1.0).mean()
    marks["forward"] = (rss_gib() - base, peak_gib() - base)
    engine.backward(loss)
    marks["backward"] = (rss_gib() - base, peak_gib() - base)
    engine.step()
    marks["step"] = (rss_gib() - base, peak_gib() - base)
    seconds = time.perf_counter() - t0
    peak = peak_gib()
    device, host = trainer_memory(cfg, ModelShape.of(str(args.model)))
    print(json.dumps({"measured_gib": peak - base, "estimated_gib": sum(device.values()) + sum(host.values()),
                      "estimate": {**device, **host}, "seconds": seconds, "marks": marks}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--seqs", default="128,512")
    ap.add_argument("--micro-batch", dest="micro", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "bench" / "memory")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    model = args.out / f"model-{args.size}"
    if not (model / "config.json").exists():
        from rlhf.tiny_model import build

        build(model, corpus=REPO / "examples/charset/prompts.jsonl", size=args.size)
    rows = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    for seq in (int(s) for s in args.seqs.split(",")):
        for ckpt in (False, True):
            for offload in (False, True):
                cmd = [sys.executable, __file__, "--one", "--model", str(model), "--seq", str(seq),
                       "--micro-batch", str(args.micro)] + (["--ckpt"] if ckpt else []) + (
                    ["--offload"] if offload else [])
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                row = {"seq": seq, "checkpointing": ckpt, "offload": offload}
                try:
                    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                except (IndexError, json.JSONDecodeError):
                    row["error"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
                rows.append(row)
                print(f"seq {seq:4d}  checkpointing {ckpt!s:5}  offload {offload!s:5}  " + (
                    f"measured {row['measured_gib']:.2f} GiB  estimated {row['estimated_gib']:.2f} GiB  "
                    f"(estimate / measured {row['estimated_gib'] / row['measured_gib']:.2f})  {row['seconds']:.1f} s"
                    if "error" not in row else f"failed: {row['error']}"), flush=True)

    def get(seq: int, ckpt: bool, offload: bool) -> dict:
        return next(r for r in rows if (r["seq"], r["checkpointing"], r["offload"]) == (seq, ckpt, offload))

    ratios = {}
    for seq in sorted({r["seq"] for r in rows}):
        plain, ck, off = get(seq, False, False), get(seq, True, False), get(seq, False, True)
        if all("error" not in r for r in (plain, ck)):
            ratios[f"checkpointing_over_plain_seq{seq}"] = ck["measured_gib"] / plain["measured_gib"]
        if all("error" not in r for r in (plain, off)):
            ratios[f"offload_over_plain_seq{seq}"] = off["measured_gib"] / plain["measured_gib"]
    errors = [r["estimated_gib"] / r["measured_gib"] - 1 for r in rows if "error" not in r]
    worst = max(errors, key=abs) if errors else None
    print("\nmeasured peak ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if worst is not None:
        print(f"estimate vs measured: worst {worst:+.0%} over {len(errors)} configurations")
    print(json.dumps({"rows": rows, **ratios, "estimate_worst_rel_error": worst}))


if __name__ == "__main__":
    main()
