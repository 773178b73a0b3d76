"""Rollout overhead: our Generator Ray actor vs plain vllm.LLM.generate, on the same batches.

    python bench/rollout_overhead.py [--model DIR] [--prompts FILE] [--batches 30] [--warmup 3] [--repeats 1]

Generated tokens/s of
  raw:             one vllm.LLM in this process; the clock runs around `llm.generate` alone;
  actor:           one rollout.generator.Generator actor (resources.generator_cpus CPUs), timed from this driver
                   around `ray.get(gen.generate.remote(batch, seed))`: what a run's driver pays per batch (Ray
                   submit, object transfer, the actor's conversion of outputs to SampleGroups) on top of vLLM;
  engine in actor: the actor's own engine on the same batch, timed inside the actor (Generator.engine_only,
                   right after each actor batch): the engine's speed in the actor, without Ray or our conversion.
Fair by construction: both engines get the actor's engine args from one config (--config; model.* and rollout.*,
seed + generator index 0, logprobs_mode="processed_logprobs", no worker extension), generator_env's variables
(same KV cache size and threads) are set before vllm is imported. With them (VLLM_ENABLE_V1_MULTIPROCESSING=0
at TP 1) both run engine core and model worker in one process: raw's LLM in this one, the actor's LLMEngine in the
actor's, stepped on a thread of its own (rollout/engine.py) while the actor's event loop serves Ray. Both get the same
batches of prompt token ids (tokenized once by the run's PromptLoader) and the same SamplingParams (temperature,
n, max_tokens, logprobs=0, per-prompt seed = batch seed + prompt.index, detokenize=False; the actor then decodes
each completion once, and raw decodes nothing). The prefix cache is reset before every
call, so repeated prompts (--repeats) are not cheaper on one side. Tokens are counted from each side's outputs
(EOS may end completions early). Both engines live side by side and take turns batch by batch, the side that
goes first alternating, so that the machine's drift (10-20 % over minutes on a shared 2-core VM) hits both
alike; an engine waiting for its turn uses no CPU. No thread settings are changed on either side; each
side's torch thread count is shown (the actor's as seen on its engine thread).
Medians are over the timed batches (after --warmup batches); tokens/s = timed tokens / timed seconds.
Prints a table, then one JSON line with actor_over_raw = actor tokens/s / raw tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sampling_params(r, prompts: list, seed: int) -> list:
    """The actor's non-greedy SamplingParams (rollout/generator.py), one per prompt."""
    from vllm import SamplingParams

    # detokenize=False as the actor's: it decodes each finished completion once (completion_texts), and
    # that decoding is counted on the actor's side only
    return [SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                           max_tokens=r.max_new_tokens, logprobs=0, seed=seed + p.index, detokenize=False)
            for p in prompts]


def batch_seed(cfg, b: int) -> int:
    return cfg.seed * 1_000_003 + b * 10_007  # as the driver derives a step's seed


class Raw:
    """One vllm.LLM in this process, with Generator.__init__'s engine args for generator index 0 (seed + index),
    less its worker extension. Built after Ray has started, so that Ray's processes do not inherit
    generator_env's variables, which are set here before vllm is imported (it reads them at import and init)."""

    def __init__(self, cfg):
        from rollout.generator import generator_env

        os.environ.update(generator_env(cfg, "cpu"))
        from vllm import LLM

        self.cfg = cfg
        self.llm = LLM(model=cfg.model.path, dtype=cfg.model.dtype, seed=cfg.seed,
                       max_model_len=cfg.rollout.max_model_len, enforce_eager=cfg.rollout.enforce_eager,
                       gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                       trust_remote_code=cfg.model.trust_remote_code, logprobs_mode="processed_logprobs")

    def run(self, batch: list, seed: int) -> tuple[float, int, int]:
        inputs = [{"prompt_token_ids": p.ids} for p in batch]
        params = sampling_params(self.cfg.rollout, batch, seed)
        self.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return dt, sum(len(c.token_ids) for o in outs for c in o.outputs), sum(len(o.outputs) for o in outs)

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()


class Actor:
    """One rollout.generator.Generator actor (resources.generator_cpus CPUs) on a local Ray cluster."""

    def __init__(self, cfg):
        import ray

        from rollout.generator import Generator, generator_env

        ray.init(address="local", num_cpus=max(2, math.ceil(cfg.resources.generator_cpus)), include_dashboard=False)
        self.gen = Generator.options(num_cpus=cfg.resources.generator_cpus,
                                     runtime_env={"env_vars": generator_env(cfg, "cpu")}).remote(0, cfg, "cpu")
        ray.get(self.gen.num_workers.remote())  # the engine is up
        self.engine_threads = 0

    def run(self, batch: list, seed: int) -> tuple[tuple[float, int, int], tuple[float, int, int]]:
        """(the driver's view of gen.generate, the engine alone inside the actor right after)."""
        import ray

        ray.get(self.gen.reset_prefix_cache.remote())
        t0 = time.perf_counter()
        groups = ray.get(self.gen.generate.remote(batch, seed))
        dt = time.perf_counter() - t0
        ray.get(self.gen.reset_prefix_cache.remote())
        *engine_row, self.engine_threads = ray.get(self.gen.engine_only.remote(batch, seed))
        return (dt, sum(len(s.completion_ids) for g in groups for s in g.samples),
                sum(len(g.samples) for g in groups)), tuple(engine_row)


def summarize(rows: list) -> dict:
    seconds = sum(r[0] for r in rows)
    return {"batches": len(rows), "median_s": statistics.median(r[0] for r in rows), "tokens": sum(r[1] for r in rows),
            "tokens_per_s": sum(r[1] for r in rows) / seconds, "completions_per_s": sum(r[2] for r in rows) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF model dir (default: the repo's tiny model at .cache/tiny-model, "
                    "built there if missing, as scripts/demo.sh does)")
    ap.add_argument("--prompts", type=Path, default=REPO / "examples/charset/prompts.jsonl", help="a .jsonl with "
                    "a 'prompt' column (the config's data.prompt_key)")
    ap.add_argument("--config", type=Path, default=REPO / "configs/grpo_tiny.yaml", help="engine args and seed")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per side (per repeat)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first, on each side")
    ap.add_argument("--prompts-per-batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="passes over the timed batches, on the same engine")
    args = ap.parse_args()
    from rlhf.config import load_config

    model = args.model or REPO / ".cache/tiny-model"
    if args.model is None and not (model / "config.json").exists():
        from rlhf.tiny_model import build

        build(model, corpus=REPO / "examples/charset/prompts.jsonl")
    size = args.prompts_per_batch * args.n
    cfg = load_config(args.config, [
        f"model.path={model.resolve()}", f"data.path={args.prompts.resolve()}", f"rollout.samples_per_prompt={args.n}",
        f"rollout.prompts_per_step={args.prompts_per_batch}", f"rollout.max_new_tokens={args.max_tokens}",
        "train.ranks=1", f"train.mini_batch_size={size}", f"train.micro_batch_size={size}", "eval.every=0"])
    os.chdir(REPO)  # Ray's workers import rollout.generator from the driver's working directory

    from transformers import AutoTokenizer

    from rlhf.data import PromptLoader, load_prompt_dataset

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    loader = PromptLoader(load_prompt_dataset(cfg.data), tokenizer, cfg.data, cfg.seed)
    batches = [loader.next_batch(args.prompts_per_batch) for _ in range(args.warmup + args.batches)]
    schedule = [(b, False) for b in range(args.warmup)]
    schedule += [(args.warmup + b, True) for _ in range(args.repeats) for b in range(args.batches)]

    actor_side = Actor(cfg)  # first: Ray's processes must not inherit generator_env's variables
    raw_side = Raw(cfg)
    raw_rows, actor_rows, engine_rows = [], [], []
    for k, (b, timed) in enumerate(schedule):  # the side that goes first alternates, so drift hits both
        for side in ((raw_side, actor_side) if k % 2 == 0 else (actor_side, raw_side)):
            row = side.run(batches[b], batch_seed(cfg, b))
            if timed and side is raw_side:
                raw_rows.append(row)
            elif timed:
                actor_rows.append(row[0])
                engine_rows.append(row[1])
    raw_threads, actor_threads = raw_side.threads(), actor_side.engine_threads
    raw, actor, engine = summarize(raw_rows), summarize(actor_rows), summarize(engine_rows)

    print(f"\n{os.cpu_count()} CPUs, {platform.platform()}; model {cfg.model.path}; {args.prompts_per_batch} prompts "
          f"x n={args.n}, max {args.max_tokens} tokens; {args.batches} batches x {args.repeats} after {args.warmup} "
          f"warm-up; enforce_eager={cfg.rollout.enforce_eager}")
    print(f"{'side':<17} {'batches':>7} {'median s/batch':>14} {'tokens/s':>9} {'completions/s':>13} {'threads':>7}")
    for name, s, threads in (("raw LLM.generate", raw, raw_threads), ("engine in actor", engine, actor_threads),
                             ("actor generate()", actor, actor_threads)):
        print(f"{name:<17} {s['batches']:>7} {s['median_s']:>14.4f} {s['tokens_per_s']:>9.1f} "
              f"{s['completions_per_s']:>13.1f} {threads:>7}")
    ratio = actor["tokens_per_s"] / raw["tokens_per_s"]
    print(f"actor_over_raw = {ratio:.3f} (engine in actor / raw = {engine['tokens_per_s'] / raw['tokens_per_s']:.3f}, "
          f"actor / engine in actor = {actor['tokens_per_s'] / engine['tokens_per_s']:.3f}); generated tokens: "
          f"raw {raw['tokens']}, actor {actor['tokens']}, engine in actor {engine['tokens']}")
    print(json.dumps({"actor_over_raw": ratio, "raw_tokens_per_s": raw["tokens_per_s"],
                      "actor_tokens_per_s": actor["tokens_per_s"], "raw_completions_per_s": raw["completions_per_s"],
                      "actor_completions_per_s": actor["completions_per_s"],
                      "engine_in_actor_tokens_per_s": engine["tokens_per_s"],
                      "engine_in_actor_over_raw": engine["tokens_per_s"] / raw["tokens_per_s"],
                      "raw_median_s": raw["median_s"], "actor_median_s": actor["median_s"],
                      "raw_tokens": raw["tokens"], "actor_tokens": actor["tokens"], "batches": raw["batches"],
                      "threads": {"raw": raw_threads, "actor": actor_threads},
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}))


if __name__ == "__main__":
    main()
