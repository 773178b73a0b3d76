"""Where a GRPO train step's time goes on one CPU rank: forward + backward + AdamW of one 32-sample mini-batch.

    python bench/train_step.py [--model .cache/smollm2] [--micro 8,16,32] [--repeats 3]

The batch has the shape of configs/grpo_smollm2_arith.yaml's steps: 8 prompts x 4 samples, prompts of
--prompt-tokens (the arithmetic questions rendered by SmolLM2's chat template with its default system prompt
are 40-45 tokens), completions of 8 to --completion-tokens tokens (random ids; the time does not depend on
which). Each variant runs the mini-batch in micro-batches of the given size, accumulating gradients, then
steps torch's AdamW (what train.optimizer=torch steps), on plain torch: no DeepSpeed, no Ray, one process.

Variants:
  scored     actors.common.micro_scores as the trainer runs it: the shared prompt forward, the output layer and
             the log-softmax only at the columns that score a completion token
  unshared   micro_scores without the shared prompt forward (ZeRO-3, gradient checkpointing)
  full       one forward over every row and column, the [b, t-1, V] logits, log-softmax of all of them (what an
             HF `model(input_ids).logits` followed by log_softmax costs), for comparison

Printed per variant and micro-batch size: the median over --repeats of the step's seconds (forward, backward,
optimizer) and its FLOP rate, 6 N T / seconds, T the token positions the variant runs (as bench/vs_trl.py
counts them: padding not counted), against the cores' fp32 peak (bench/vs_trl.py's cpu_fp32_peak).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.common import micro_scores  # noqa: E402
from rlhf.algorithms import token_logprobs  # noqa: E402
from rlhf.types import Prompt, Sample, TrainBatch, collate  # noqa: E402


def batch_of(vocab: int, prompts: int, group: int, prompt_tokens: int, completion_tokens: int,
             seed: int = 0) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for p in range(prompts):
        ids = torch.randint(0, vocab, (prompt_tokens - p % 3,), generator=gen).tolist()
        for _ in range(group):
            n = int(torch.randint(8, completion_tokens + 1, (1,), generator=gen))
            done = torch.randint(0, vocab, (n,), generator=gen).tolist()
            samples.append(Sample(Prompt(p, "", ids, {}), done, [0.0] * n, "", False, 0, 0))
    return collate(samples, pad_id=0)


def full_logprobs(model: torch.nn.Module, mb: TrainBatch) -> torch.Tensor:
    logits = model(input_ids=mb.input_ids[:, :-1], attention_mask=mb.attention_mask[:, :-1], use_cache=False).logits
    return token_logprobs(logits, mb.input_ids[:, 1:])


def positions(batch: TrainBatch, variant: str) -> int:
    """Token positions the variant's forward runs, padding not counted."""
    lengths = batch.attention_mask.sum(-1) - 1  # the last position is not run
    if variant != "scored":
        return int(lengths.sum())
    prompts = {tuple(batch.input_ids[i, : int(p)].tolist()) for i, p in enumerate(batch.prompt_lengths)}
    return sum(len(p) for p in prompts) + int((lengths + 1 - batch.prompt_lengths - 1).clamp(min=0).sum())


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: TrainBatch, micro: int,
         variant: str) -> tuple[float, float, float]:
    fwd = bwd = 0.0
    for mb in batch.chunks(max(1, batch.size // micro)):
        t0 = time.perf_counter()
        if variant == "full":
            logp = full_logprobs(model, mb)
        else:
            logp = micro_scores(model, mb, 1.0, torch.device("cpu"), share_prompts=variant == "scored").logp
        loss = -(logp * mb.loss_mask).sum() / batch.loss_mask.sum()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
    t3 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return fwd, bwd, time.perf_counter() - t3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".cache" / "smollm2"))
    ap.add_argument("--micro", default="8,32")
    ap.add_argument("--variants", default="scored,unshared,full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=44)
    ap.add_argument("--completion-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from vs_trl import cpu_fp32_peak

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())  # a tied matrix once
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    batch = batch_of(model.config.vocab_size, 8, 4, args.prompt_tokens, args.completion_tokens)
    peak = cpu_fp32_peak()
    peak_gflops = peak["peak_flops_per_s"] / 1e9
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters, vocabulary {model.config.vocab_size}; batch "
          f"{batch.size} x {batch.input_ids.shape[1]} columns; fp32 peak {peak_gflops:.0f} GFLOP/s "
          f"({peak['cores']} cores, {peak['isa']}); {args.threads} threads")
    print(f"{'variant':<9} {'micro':>5} {'step_s':>7} {'fwd_s':>6} {'bwd_s':>6} {'adam_s':>6} {'tokens':>6} "
          f"{'GFLOP/s':>7} {'of peak':>7}")
    step(model, opt, batch, 32, "scored")  # warm-up: allocator, oneDNN kernels
    for variant in args.variants.split(","):
        for micro in (int(m) for m in args.micro.split(",")):
            runs = [step(model, opt, batch, micro, variant) for _ in range(args.repeats)]
            fwd, bwd, adam = (statistics.median(r[i] for r in runs) for i in range(3))
            total, tokens = fwd + bwd + adam, positions(batch, variant)
            rate = 6 * n_params * tokens / (fwd + bwd + adam) / 1e9
            print(f"{variant:<9} {micro:>5} {total:>7.2f} {fwd:>6.2f} {bwd:>6.2f} {adam:>6.2f} {tokens:>6} "
                  f"{rate:>7.1f} {rate / peak_gflops:>7.0%}", flush=True)


if __name__ == "__main__":
    main()
