"""Sync vs async rollouts with the generator and the trainer on disjoint CPU cores.

    python bench/async_overlap.py [--steps N] [--seeds 1,2,3] [--staleness 1] [--out DIR]

The generator (vLLM) is pinned to core 0 and the trainer (DeepSpeed) to core 1, one thread each
(resources.generator_cores / trainer_cores), as they would sit on two GPUs. The task is the charset
GRPO task with the tiny model (rlhf-tiny-model), sized so that generating a batch and training on it
take comparable time. For each seed it runs `python -m rlhf.train` twice, one run at a time:
rollout.mode=sync, then rollout.mode=async with rollout.max_staleness=--staleness.

Figures (medians over steps 2..N, step 1 being warm-up; then medians over seeds):
  sync step s, async step s     the driver's timing/step_s
  generate s, train s           from the sync run: generation + reward scoring (what the producer does),
                                and the trainer's update (+ its log-prob pass, if any)
  max phase s                   max(generate, train) of the sync run: the best an overlap can do
  async_over_max_phase          async step / max phase (target <= 1.25)
  sync_over_async               sync step / async step (target >= 1.3)
  reward                        mean reward of the last 5 steps; the margin is the spread (max - min)
                                of the sync runs' value across seeds, the noise an async run is judged by
The last line is one JSON object with these figures and the per-seed ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import run_measured  # noqa: E402  (the same subprocess runner and memory poller)

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "examples" / "charset"


def config(model: Path, mode: str, staleness: int, steps: int, seed: int, out: Path) -> dict:
    return {
        "name": f"overlap_{mode}_s{seed}", "seed": seed, "steps": steps,
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"path": str(TASK / "prompts.jsonl")},
        "rollout": {"mode": mode, "num_generators": 1, "prompts_per_step": 8, "samples_per_prompt": 4,
                    "max_new_tokens": 32, "temperature": 1.0, "threads": 1,
                    **({"max_staleness": staleness} if mode == "async" else {})},  # sync mode refuses it
        "reward": {"functions": [{"fn": f"{TASK / 'reward.py'}:charset_reward"}]},
        "algorithm": {"advantage": "grpo", "loss_agg": "token-mean", "kl_coef": 0.0},
        "train": {"ranks": 1, "zero_stage": 0, "lr": 3.0e-3, "mini_batch_size": 32, "micro_batch_size": 16,
                  "threads": 1},
        "weight_sync": {"verify": False},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "save_final": False},
        "logging": {"output_dir": str(out / "runs"), "wandb": "disabled"},
        "resources": {"generator_cpus": 1, "trainer_cpus": 1, "generator_cores": [0], "trainer_cores": [1]},
    }


def run(model: Path, mode: str, staleness: int, steps: int, seed: int, out: Path) -> dict:
    path = out / f"{mode}_s{seed}.yaml"
    path.write_text(yaml.safe_dump(config(model, mode, staleness, steps, seed, out), sort_keys=False))
    lines, mem = run_measured([sys.executable, "-m", "rlhf.train", "--config", str(path)], out / f"{mode}_s{seed}.log")
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("summary: ")).split(" ", 1)[1])
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:]

    def med(*keys: str) -> float:
        return statistics.median(sum(r.get(k, 0.0) for k in keys) for r in steady)

    return {"step_s": med("timing/step_s"), "generate_s": med("timing/generate_s", "timing/reward_s"),
            "train_s": med("timing/train_s", "timing/logprobs_s"), "sync_s": med("timing/sync_s"),
            "wait_s": med("timing/wait_s"), "staleness_mean": statistics.mean(r["buffer/staleness_mean"] for r in rows),
            "dropped": sum(r["data/prompts_dropped"] for r in rows),
            "reward_last5": statistics.mean(r["reward/mean"] for r in rows[-5:]),
            "reward_first5": statistics.mean(r["reward/mean"] for r in rows[:5]), "peak_rss_gib": mem["peak_rss_gib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "bench" / "async_overlap")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "model"
    if not (model / "config.json").exists():
        from rlhf.tiny_model import build

        build(model, corpus=TASK / "prompts.jsonl")
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        sync = run(model, "sync", args.staleness, args.steps, seed, args.out)
        asyn = run(model, "async", args.staleness, args.steps, seed, args.out)
        max_phase = max(sync["generate_s"], sync["train_s"])
        per_seed.append({"seed": seed, "sync": sync, "async": asyn, "max_phase_s": max_phase,
                         "async_over_max_phase": asyn["step_s"] / max_phase,
                         "sync_over_async": sync["step_s"] / asyn["step_s"],
                         "reward_async_minus_sync": asyn["reward_last5"] - sync["reward_last5"]})
        print(f"seed {seed}: sync step {sync['step_s']:.3f} s (generate {sync['generate_s']:.3f}, train "
              f"{sync['train_s']:.3f}, sync {sync['sync_s']:.3f}) | async step {asyn['step_s']:.3f} s "
              f"(waited {asyn['wait_s']:.3f}, staleness {asyn['staleness_mean']:.2f}, dropped {asyn['dropped']:g}) "
              f"| reward last 5: sync {sync['reward_last5']:.3f}, async {asyn['reward_last5']:.3f}", flush=True)

    def med(key: str, mode: str | None = None) -> float:
        return statistics.median((r[mode][key] if mode else r[key]) for r in per_seed)

    sync_rewards = [r["sync"]["reward_last5"] for r in per_seed]
    result = {
        "sync_step_s": med("step_s", "sync"), "async_step_s": med("step_s", "async"),
        "generate_s": med("generate_s", "sync"), "train_s": med("train_s", "sync"), "sync_s": med("sync_s", "sync"),
        "max_phase_s": med("max_phase_s"), "async_over_max_phase": med("async_over_max_phase"),
        "sync_over_async": med("sync_over_async"), "reward_sync_last5": statistics.median(sync_rewards),
        "reward_async_last5": med("reward_last5", "async"),
        "reward_async_minus_sync": med("reward_async_minus_sync"),
        "reward_margin": max(sync_rewards) - min(sync_rewards),
        "staleness": args.staleness, "steps": args.steps, "seeds": seeds, "per_seed": per_seed,
    }
    print(f"\nmedians over {len(seeds)} seed(s), {args.steps} steps, generator on core 0, trainer on core 1")
    print(f"  sync step      {result['sync_step_s']:.3f} s")
    print(f"  async step     {result['async_step_s']:.3f} s   (max_staleness {args.staleness})")
    print(f"  max(generate {result['generate_s']:.3f}, train {result['train_s']:.3f}) = {result['max_phase_s']:.3f} s;"
          f" weight sync {result['sync_s']:.3f} s")
    print(f"  async / max phase  {result['async_over_max_phase']:.2f}  (target <= 1.25)")
    print(f"  sync / async       {result['sync_over_async']:.2f}  (target >= 1.3)")
    print(f"  reward, last 5 steps: sync {result['reward_sync_last5']:.3f}, async {result['reward_async_last5']:.3f};"
          f" async - sync {result['reward_async_minus_sync']:+.3f}, sync's spread over seeds "
          f"{result['reward_margin']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
