"""Our GRPO (Ray + vLLM + DeepSpeed) side by side with Hugging Face TRL's GRPOTrainer on the peer's CPU task.

    python bench/vs_trl.py [--size tiny|50m|both] [--steps N] [--seeds 1,2,3] [--out DIR]

The task and the peer are the team's peer benchmark (shared/peer_trl, copied to bench/peer_trl/): a random-init
Qwen2 ("tiny": 3.7M parameters, "50m": 48M) with a locally trained tokenizer, 512 prompts alternating
"Compute A plus B using only digits:" and "Repeat the letter X many times:", and a reward that is the fraction
of the completion's non-space characters in the row's `charset` (bench/peer_trl/reward.py for TRL,
examples/charset/reward.py for us: the same function of the same column).

Both systems run as subprocesses, one at a time (for each seed: TRL, then ours), with the same settings:
8 prompts x 4 samples per step, 32 new tokens, temperature 1, top-p 1, no top-k, fp32, one AdamW step per
step (betas 0.9/0.999, eps 1e-8, no weight decay, grad clip 1.0, lr decaying linearly to 0), no KL (beta 0),
clip 0.2/0.2, token-mean loss over the batch (TRL's default "dapo"), group-normalised advantages
(r - mean) / (std + 1e-4) with the unbiased std (TRL's default scale_rewards="group"), prompts in order.
TRL generates with transformers' generate: its vLLM colocate mode fails on CPU at its first weight sync
(vLLM's CPU backend prepacks Linear weights and drops the Parameters TRL loads into; shared/peer_trl/README.md).

Per run, as the peer's README defines them:
  completions/s  completions of steps 2..N / their wall time (step 1 is warm-up): TRL's wall between
                 on_step_end callbacks, our driver's timing/step_s
  reward         mean of the first 5 and the last 5 steps; gain = last - first
  peak RSS       the largest total RSS of the subprocess's process tree, polled every 0.25 s: for us the driver,
                 Ray's own processes (GCS, raylet, dashboard, agents) and the actors. A page shared by several
                 processes counts once per process in RSS, so the tree's PSS is shown too (polled every 5 s:
                 reading /proc/PID/smaps_rollup walks page tables, ~15 ms per GB resident).
  ceiling        TRL's step time / our train phase: the ratio we would reach if generating, scoring and
                 syncing cost nothing. Both systems train the same model on the same tokens in fp32, so
                 this bounds what speeding up our rollouts can give on these 2 cores.
Prints a table per size, then one JSON line (top level: the tiny model; "50m": the 48M model; medians over
seeds, per-seed lists under "per_seed").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "bench" / "peer_trl"
DEFAULT_STEPS = {"tiny": 30, "50m": 24}  # at 12 steps the 48M gains (~0.02) are within noise
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- memory of a process tree ----

def tree_pids(root: int) -> list[int]:
    """root and all its descendants, from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo += children.get(pids[-1], [])
    return pids


def _read_bytes(pid: int, what: str) -> int:
    try:
        if what == "rss":
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def peak_tree_rss(proc: subprocess.Popen, interval_s: float = 0.25, rescan_every: int = 8,
                  pss_every: int = 20) -> dict[str, float]:
    """Poll the process tree of `proc` until it exits; the peaks of its summed RSS and PSS, in GiB.
    The poller shares the 2 cores with the system it measures, so it does little: the tree (a scan of
    all of /proc) is found again every 2 s, RSS read every 0.25 s, PSS (a page-table walk) every 5 s.
    That costs about 2.5 % of one core (6 % when everything was polled every 0.2 s)."""
    peak = {"rss": 0, "pss": 0}
    polls, pids = 0, [proc.pid]
    while proc.poll() is None:
        if polls % rescan_every == 0:
            pids = tree_pids(proc.pid)
        for what in ("rss", "pss") if polls % pss_every == 0 else ("rss",):
            peak[what] = max(peak[what], sum(_read_bytes(p, what) for p in pids))
        polls += 1
        time.sleep(interval_s)
    return {"peak_rss_gib": peak["rss"] / 2**30, "peak_pss_gib": peak["pss"] / 2**30}


def run_measured(cmd: list[str], log_path: Path) -> tuple[list[str], dict[str, float]]:
    """Run cmd (output to log_path), measuring its process tree's peak memory and its whole wall time."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="disabled",
               RAY_ADDRESS="local")  # our driver's ray.init() starts its own cluster, never attaches to another
    lines: list[str] = []
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def read() -> None:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        mem = peak_tree_rss(proc)
        reader.join(timeout=30)  # a Ray daemon may hold the pipe a moment after the driver exits
    mem["process_wall_s"] = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(lines[-25:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}; log {log_path}:\n{tail}")
    return lines, mem


# ---- the two systems ----

def figures(walls: list[float], completions: list[float], rewards: list[float],
            phases: list[dict[str, float]]) -> dict:
    """The peer README's metrics from per-step walls, completion counts, mean rewards and phase times."""
    steady = range(1, len(walls))  # step 1 is warm-up
    k = min(5, len(rewards))
    first, last = statistics.mean(rewards[:k]), statistics.mean(rewards[-k:])
    keys = list(dict.fromkeys(key for i in steady for key in phases[i]))  # in the order the phases run
    return {"samples_per_s": sum(completions[i] for i in steady) / sum(walls[i] for i in steady),
            "completions_per_step": statistics.mean(completions[i] for i in steady),
            "step_s_median": statistics.median(walls[i] for i in steady), "step1_s": walls[0],
            "reward_first5": first, "reward_last5": last, "reward_gain": last - first, "rewards": rewards,
            "phases_s": {key: statistics.mean(phases[i].get(key, 0.0) for i in steady) for key in keys}}


def run_trl(task: Path, steps: int, lr: float, seed: int, out: Path) -> dict:
    cmd = [sys.executable, str(PEER / "run_trl.py"), "--model", str(task / "model"),
           "--prompts", str(task / "prompts.jsonl"), "--steps", str(steps), "--lr", str(lr), "--seed", str(seed),
           "--out", str(out / "trl_output")]
    lines, mem = run_measured(cmd, out / "trl.log")
    rows = [json.loads(line) for line in lines if line.startswith('{"step"')]
    summary = next(json.loads(line) for line in lines if line.startswith('{"summary"'))
    completions = [float(summary["completions_per_step"])] * len(rows)
    phases = [{k.removeprefix("GRPOTrainer."): v for k, v in r["phases_s"].items()} for r in rows]
    return {**figures([r["wall_s"] for r in rows], completions, [r["reward_mean"] for r in rows], phases), **mem}


def ours_config(task: Path, steps: int, lr: float, seed: int, out: Path, threads: int, compiled: bool,
                async_pinned: bool = False) -> dict:
    """Our config with TRL's settings (see the module docstring); written as YAML for `python -m rlhf.train`.
    async_pinned: rollout.mode=async (samples at most 1 version old, truncated IS), the generator on core 0
    and the trainer on core 1, one thread each, so that generation and training overlap."""
    cfg = {
        "name": f"vs_trl_s{seed}", "seed": seed, "steps": steps,
        "model": {"path": str(task / "model"), "dtype": "float32"},
        "data": {"path": str(task / "prompts.jsonl"), "prompt_key": "prompt", "shuffle": False,
                 "max_prompt_tokens": 64},
        "rollout": {"num_generators": 1, "prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 32,
                    "temperature": 1.0, "top_p": 1.0, "top_k": -1, "threads": threads,
                    "enforce_eager": not compiled},
        "reward": {"functions": [{"fn": f"{REPO}/examples/charset/reward.py:charset_reward", "weight": 1.0}]},
        "algorithm": {"advantage": "grpo", "policy_loss": "ppo_clip", "loss_agg": "token-mean", "clip_low": 0.2,
                      "clip_high": 0.2, "kl_coef": 0.0, "ppo_epochs": 1, "std_eps": 1.0e-4},
        "train": {"ranks": 1, "zero_stage": 0, "lr": lr, "lr_schedule": "linear", "weight_decay": 0.0,
                  "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "mini_batch_size": 32, "micro_batch_size": 32,
                  "threads": threads},
        "weight_sync": {"verify": False},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "save_final": False},
        "logging": {"output_dir": str(out / "runs"), "wandb": "disabled"},
        "resources": {"generator_cpus": 1, "trainer_cpus": 1},
    }
    if async_pinned:
        cfg["rollout"].update({"mode": "async", "max_staleness": 1, "threads": 1})
        cfg["train"]["threads"] = 1
        cfg["resources"].update({"generator_cores": [0], "trainer_cores": [1]})
    return cfg


def run_ours(task: Path, steps: int, lr: float, seed: int, out: Path, threads: int, compiled: bool,
             async_pinned: bool = False) -> dict:
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(ours_config(task, steps, lr, seed, out, threads, compiled, async_pinned),
                                     sort_keys=False))
    lines, mem = run_measured([sys.executable, "-m", "rlhf.train", "--config", str(config)], out / "ours.log")
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("summary: ")).split(" ", 1)[1])
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    phases = [{k.removeprefix("timing/").removesuffix("_s"): v for k, v in r.items()
               if k.startswith("timing/") and k != "timing/step_s"} for r in rows]
    return {**figures([r["timing/step_s"] for r in rows], [r["rollout/samples"] for r in rows],
                      [r["reward/mean"] for r in rows], phases), **mem, "run_dir": summary["run_dir"]}


# ---- report ----

KEYS = ["samples_per_s", "step_s_median", "step1_s", "reward_first5", "reward_last5", "reward_gain",
        "peak_rss_gib", "peak_pss_gib", "process_wall_s"]
LABELS = ["completions/s (steps 2..N)", "step s, median (2..N)", "step 1 s (warm-up)", "reward, first 5 steps",
          "reward, last 5 steps", "reward gain", "peak RSS GiB (tree)", "peak PSS GiB (tree)",
          "process wall s (all in)"]


def median_of(results: list[dict], key: str) -> float | None:
    return statistics.median(r[key] for r in results) if results else None


def report(size: str, n_params: int, steps: int, lr: float, seeds: list[int], res: dict[str, list[dict]]) -> dict:
    print(f"\n== {size}: {n_params / 1e6:.2f}M parameters, {steps} steps, lr {lr:g}, seeds {seeds} "
          f"(medians over seeds) ==")
    print(f"{'':<28} {'TRL':>9} {'ours':>9} {'ours/TRL':>9}")
    for key, label in zip(KEYS, LABELS):
        t, o = median_of(res["trl"], key), median_of(res["ours"], key)
        cells = [f"{v:>9.3f}" if v is not None else f"{'-':>9}" for v in (t, o)]
        ratio = f"{o / t:>9.2f}" if t and o is not None and not key.startswith("reward") else ""
        print(f"{label:<28} {cells[0]} {cells[1]} {ratio}")
    for system, name in (("trl", "TRL"), ("ours", "ours")):
        if res[system]:
            phases = {k: statistics.median(r["phases_s"].get(k, 0.0) for r in res[system])
                      for k in res[system][0]["phases_s"]}
            print(f"{name} phases, s per step (2..N): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    out: dict = {"samples_per_s_ratio": None}
    per_seed: dict[str, list[float]] = {}
    for key in ("reward_gain", "samples_per_s", "peak_rss_gib", "peak_pss_gib", "reward_first5", "reward_last5"):
        for system in ("ours", "trl"):
            name = f"{system}_{key}" if key == "samples_per_s" else f"{key}_{system}"
            median = median_of(res[system], key)
            out[name] = round(median, 4) if median is not None else None
            per_seed[name] = [round(r[key], 4) for r in res[system]]
    if out["ours_samples_per_s"] and out["trl_samples_per_s"]:
        out["samples_per_s_ratio"] = round(out["ours_samples_per_s"] / out["trl_samples_per_s"], 3)
        per_seed["samples_per_s_ratio"] = [round(o / t, 3) for o, t in zip(per_seed["ours_samples_per_s"],
                                                                           per_seed["trl_samples_per_s"])]
        print(f"ours/TRL completions/s, {size}: {out['samples_per_s_ratio']:.2f} (same seed, per seed: "
              f"{', '.join(f'{x:.2f}' for x in per_seed['samples_per_s_ratio'])})")
        if len(seeds) > 1:  # the issue's reward condition: ours >= TRL's minus the seeds' noise
            margin = max(statistics.stdev(per_seed["reward_gain_ours"]), statistics.stdev(per_seed["reward_gain_trl"]))
            out["reward_noise_margin"] = round(margin, 4)
            out["reward_condition_met"] = out["reward_gain_ours"] >= out["reward_gain_trl"] - margin
            print(f"reward gain, {size}: ours {out['reward_gain_ours']:.3f} vs TRL {out['reward_gain_trl']:.3f} "
                  f"(medians); noise margin {margin:.3f} (the larger seed-to-seed standard deviation); "
                  f"ours >= TRL - margin: {out['reward_condition_met']}")
        trl_step = statistics.median(r["completions_per_step"] / r["samples_per_s"] for r in res["trl"])
        our_train = statistics.median(r["phases_s"]["train"] for r in res["ours"])
        out["ceiling_if_rollouts_free"] = round(trl_step / our_train, 3)
        print(f"ceiling, {size}: TRL's step {trl_step:.3f} s / our train phase {our_train:.3f} s = "
              f"{out['ceiling_if_rollouts_free']:.2f}x, the ratio if generation, reward and sync took no time")
    return {**out, "steps": steps, "lr": lr, "seeds": seeds, "per_seed": per_seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "50m", "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="default: 30 for tiny, 24 for 50m")
    ap.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    ap.add_argument("--out", default=str(REPO / ".cache" / "bench" / "vs_trl"))
    ap.add_argument("--lr-tiny", type=float, default=3e-3)
    ap.add_argument("--lr-50m", type=float, default=1e-3)
    ap.add_argument("--compiled", action="store_true",
                    help="our rollout.enforce_eager=false: vLLM compiles the model at start-up (slower start, faster "
                         "generation)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="our rollout.threads and train.threads: generation and training take turns, so each uses "
                         "every core, as TRL's single process does")
    ap.add_argument("--async-pinned", action="store_true",
                    help="ours in rollout.mode=async, the generator on core 0 and the trainer on core 1")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: report the results an earlier run saved under --out")
    args = ap.parse_args()
    out_root = Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = ["tiny", "50m"] if args.size == "both" else [args.size]
    print(f"{os.cpu_count()} CPU cores; TRL {'skipped' if args.skip_trl else 'with transformers generate'} "
          "(TRL's vLLM colocate mode fails on CPU at its first weight sync); ours: Ray + vLLM + DeepSpeed, "
          "its own local Ray cluster; one system at a time")

    final: dict = {}
    for size in sizes:
        task = out_root / f"task-{size}"
        if not (task / "task_info.json").exists():
            subprocess.run([sys.executable, str(PEER / "make_task.py"), str(task), size], check=True)
        n_params = json.loads((task / "task_info.json").read_text())["n_params"]
        steps = args.steps or DEFAULT_STEPS[size]
        lr = args.lr_tiny if size == "tiny" else args.lr_50m
        res: dict[str, list[dict]] = {"trl": [], "ours": []}
        for seed in seeds:
            for system in ("trl", "ours"):
                if getattr(args, f"skip_{system}"):
                    continue
                out = out_root / f"{size}-s{seed}-{system}"
                if args.report_only:
                    res[system].append(json.loads((out / "result.json").read_text()))
                    continue
                out.mkdir(parents=True, exist_ok=True)
                r = (run_trl(task, steps, lr, seed, out) if system == "trl"
                     else run_ours(task, steps, lr, seed, out, args.threads, args.compiled, args.async_pinned))
                res[system].append(r)
                (out / "result.json").write_text(json.dumps(r, indent=1))
                print(f"{size} seed {seed} {system:>4}: {r['samples_per_s']:.1f} completions/s, reward "
                      f"{r['reward_first5']:.3f} -> {r['reward_last5']:.3f}, peak RSS {r['peak_rss_gib']:.2f} GiB "
                      f"(PSS {r['peak_pss_gib']:.2f}), {r['process_wall_s']:.0f} s all in; log in {out}", flush=True)
        if size == "tiny":  # the top level; "tiny" comes first
            final.update(report(size, n_params, steps, lr, seeds, res))
        else:
            final[size] = report(size, n_params, steps, lr, seeds, res)
    print(json.dumps(final))


if __name__ == "__main__":
    main()
