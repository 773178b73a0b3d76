"""Our GRPO (Ray + vLLM + DeepSpeed) side by side with Hugging Face TRL's GRPOTrainer on the peer's CPU task.

    python bench/vs_trl.py [--size tiny|50m|smollm2|both|all] [--steps N] [--seeds 1,2,3] [--out DIR]

("both": tiny and 50m, as before; "all": tiny, 50m and smollm2.)

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

The real model ("smollm2", issue 17): SmolLM2-135M-Instruct (134.5M parameters, tied embeddings, ChatML template,
EOS <|im_end|>), the fp32 checkpoint of `python -m rlhf.models smollm2 --out .cache/smollm2` (run by this script
when --smollm2-dir holds no complete conversion), on the arithmetic task of configs/grpo_smollm2_arith.yaml:
examples/arith/prompts.jsonl ("What is 4 + 18? Reply with the number only.", an `answer` column), each prompt a
user message rendered by the model's chat template with its default system prompt (ours:
data.apply_chat_template=true; TRL: a conversational dataset, run_trl.py --chat), and reward.builtin:math_answer on
both sides (TRL: the same function, wrapped in TRL's signature by run_trl.py's trl_reward). From that config:
8 prompts x 4 samples, 24 new tokens, temperature 0.7, lr 2e-5, fp32, beta 0, prompts of at most 128 tokens,
micro-batches of 16 (TRL: one of 32; the same gradient). Kept from the peer task's settings above, and so differing
from the shipped config: lr decaying linearly to 0 (TRL's scheduler; the config's is constant), std + 1e-4 (TRL's;
the config's is 1e-6), ZeRO stage 0 (one rank: the same update as the config's stage 1), no weight-sync
verification, clip 0.2/0.2, token-mean loss, scale_rewards="group". One difference from the peer task: TRL runs
without activation checkpointing. GRPOConfig turns it on by default (the peer task keeps that, as the peer runs it),
and it re-runs every layer's forward in the backward pass, ~1/3 more compute than our trainer, which does not
checkpoint; --trl-checkpointing restores TRL's default. Our run logs every sample (logging.samples_per_step=32) so
that the train phase's tokens can be counted.

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
For smollm2 also our phases (medians over steps 2..N of timing/generate_s, timing/logprobs_s, timing/train_s,
timing/sync_s, train/forward_s, train/backward_s, train/optimizer_s in metrics.jsonl) and the train phase's FLOP rate:
  FLOP/s         6 x N x T / timing/train_s, per step, median over steps 2..N: N the model's parameters (a tied
                 matrix counted once: the output layer's matmul; the embedding lookup costs nothing), 6 = 2 for
                 the forward + 4 for the backward per parameter and token, T the token positions the train phase
                 runs, padding not counted: with the shared prompt forward (train.share_prompt_forward, on) each
                 group's prompt P once plus C - 1 positions per completion of C tokens (the last scores nothing),
                 otherwise P + C - 1 per sample
  fp32 peak      cores x GHz x FLOPs per cycle, from /proc/cpuinfo: physical cores this process may run on, the
                 "cpu MHz" clock, and 2 FMA units x SIMD lanes (16 with avx512f, 8 with avx2 and fma) x 2 FLOPs
                 per FMA (a multiply and an add, as 6 x N x T counts them); an AMD CPU with avx512f but not
                 avx512_vp2intersect (Zen 4) runs 512-bit FMAs as two 256-bit halves: 8 lanes.
                 --peak-flops-per-cycle overrides the FLOPs per cycle
Prints a table per size, then one JSON line (top level: the tiny model; "50m": the 48M model; "smollm2": the real
model; medians over seeds, per-seed lists under "per_seed").
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
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "bench" / "peer_trl"
# at 12 steps the 48M gains (~0.02) are within noise; smollm2 takes ~30-45 s a step (step 1 is warm-up)
DEFAULT_STEPS = {"tiny": 30, "50m": 24, "smollm2": 10}
SIZES = {"both": ["tiny", "50m"], "all": ["tiny", "50m", "smollm2"]}
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


# ---- the tasks ----

@dataclass(frozen=True)
class Task:
    """What differs between the sizes: the model, the prompts, the reward and the sampling settings. The
    defaults are the peer task's (tiny, 50m); everything else is the same for every size (module docstring)."""

    size: str
    model: Path
    prompts: Path
    n_params: int
    lr: float
    max_new_tokens: int = 32
    temperature: float = 1.0
    max_prompt_tokens: int = 64
    chat: bool = False  # prompts rendered by the model's chat template (ours: data.apply_chat_template)
    our_reward: str = f"{REPO}/examples/charset/reward.py:charset_reward"
    trl_reward: str = ""  # run_trl.py --reward: "" = the peer's bench/peer_trl/reward.py
    micro_batch_size: int = 32  # ours; TRL runs its 32 completions in one micro-batch
    trl_checkpointing: bool = True  # TRL's GRPOConfig default (activation checkpointing), as the peer runs it
    profile: bool = False  # our phase medians and the train phase's FLOP rate (logs every sample to count tokens)


def peer_task(size: str, out_root: Path, lr: float) -> Task:
    """The peer's task (bench/peer_trl/make_task.py), built under out_root on first use."""
    task = out_root / f"task-{size}"
    if not (task / "task_info.json").exists():
        subprocess.run([sys.executable, str(PEER / "make_task.py"), str(task), size], check=True)
    n_params = json.loads((task / "task_info.json").read_text())["n_params"]
    return Task(size, task / "model", task / "prompts.jsonl", n_params, lr)


def smollm2_task(model_dir: Path, lr: float, trl_checkpointing: bool) -> Task:
    """SmolLM2-135M-Instruct on examples/arith, configs/grpo_smollm2_arith.yaml's settings (module docstring).
    Fetches and converts the model with `python -m rlhf.models smollm2` when model_dir holds no conversion."""
    sys.path.insert(0, str(REPO))
    from rlhf.models import marker

    if marker(model_dir) is None:
        subprocess.run([sys.executable, "-m", "rlhf.models", "smollm2", "--out", str(model_dir)], cwd=REPO,
                       check=True)
    return Task("smollm2", model_dir, REPO / "examples" / "arith" / "prompts.jsonl", marker(model_dir)["parameters"],
                lr, max_new_tokens=24, temperature=0.7, max_prompt_tokens=128, chat=True,
                our_reward="reward.builtin:math_answer", trl_reward="reward.builtin:math_answer", micro_batch_size=16,
                trl_checkpointing=trl_checkpointing, profile=True)


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


def run_trl(task: Task, steps: int, seed: int, out: Path) -> dict:
    cmd = [sys.executable, str(PEER / "run_trl.py"), "--model", str(task.model),
           "--prompts", str(task.prompts), "--steps", str(steps), "--lr", str(task.lr), "--seed", str(seed),
           "--out", str(out / "trl_output"), "--max-completion-length", str(task.max_new_tokens),
           "--temperature", str(task.temperature), "--max-prompt-length", str(task.max_prompt_tokens)]
    cmd += ["--reward", task.trl_reward] if task.trl_reward else []
    cmd += ["--chat"] if task.chat else []
    cmd += [] if task.trl_checkpointing else ["--no-gradient-checkpointing"]
    lines, mem = run_measured(cmd, out / "trl.log")
    rows = [json.loads(line) for line in lines if line.startswith('{"step"')]
    summary = next(json.loads(line) for line in lines if line.startswith('{"summary"'))
    completions = [float(summary["completions_per_step"])] * len(rows)
    phases = [{k.removeprefix("GRPOTrainer."): v for k, v in r["phases_s"].items()} for r in rows]
    return {**figures([r["wall_s"] for r in rows], completions, [r["reward_mean"] for r in rows], phases), **mem}


def ours_config(task: Task, steps: int, seed: int, out: Path, threads: int, compiled: bool,
                async_pinned: bool = False) -> dict:
    """Our config with TRL's settings (see the module docstring); written as YAML for `python -m rlhf.train`.
    async_pinned: rollout.mode=async (samples at most 1 version old, truncated IS), the generator on core 0
    and the trainer on core 1, one thread each, so that generation and training overlap."""
    cfg = {
        "name": f"vs_trl_s{seed}", "seed": seed, "steps": steps,
        "model": {"path": str(task.model), "dtype": "float32"},
        "data": {"path": str(task.prompts), "prompt_key": "prompt", "shuffle": False,
                 "max_prompt_tokens": task.max_prompt_tokens},
        "rollout": {"num_generators": 1, "prompts_per_step": 8, "samples_per_prompt": 4,
                    "max_new_tokens": task.max_new_tokens, "temperature": task.temperature, "top_p": 1.0, "top_k": -1,
                    "threads": threads, "enforce_eager": not compiled},
        "reward": {"functions": [{"fn": task.our_reward, "weight": 1.0}]},
        "algorithm": {"advantage": "grpo", "policy_loss": "ppo_clip", "loss_agg": "token-mean", "clip_low": 0.2,
                      "clip_high": 0.2, "kl_coef": 0.0, "ppo_epochs": 1, "std_eps": 1.0e-4},
        "train": {"ranks": 1, "zero_stage": 0, "lr": task.lr, "lr_schedule": "linear", "weight_decay": 0.0,
                  "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "mini_batch_size": 32,
                  "micro_batch_size": task.micro_batch_size, "threads": threads},
        "weight_sync": {"verify": False},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "save_final": False},
        "logging": {"output_dir": str(out / "runs"), "wandb": "disabled"},
        "resources": {"generator_cpus": 1, "trainer_cpus": 1},
    }
    if task.chat:
        cfg["data"]["apply_chat_template"] = True  # the template's own default system prompt, as TRL renders it
    if task.profile:
        cfg["logging"]["samples_per_step"] = 32  # every sample: train_tokens counts the tokens the train phase runs
    if async_pinned:
        cfg["rollout"].update({"mode": "async", "max_staleness": 1, "threads": 1})
        cfg["train"]["threads"] = 1
        cfg["resources"].update({"generator_cores": [0], "trainer_cores": [1]})
    return cfg


def run_ours(task: Task, steps: int, seed: int, out: Path, threads: int, compiled: bool,
             async_pinned: bool = False) -> dict:
    config = out / "config.yaml"
    cfg = ours_config(task, steps, seed, out, threads, compiled, async_pinned)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    lines, mem = run_measured([sys.executable, "-m", "rlhf.train", "--config", str(config)], out / "ours.log")
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("summary: ")).split(" ", 1)[1])
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    phases = [{k.removeprefix("timing/").removesuffix("_s"): v for k, v in r.items()
               if k.startswith("timing/") and k != "timing/step_s"} for r in rows]
    result = {**figures([r["timing/step_s"] for r in rows], [r["rollout/samples"] for r in rows],
                        [r["reward/mean"] for r in rows], phases), **mem, "run_dir": summary["run_dir"]}
    if task.profile:
        shared = cfg["train"]["zero_stage"] != 3  # train.shares_prompts with its defaults (rlhf/config.py)
        tokens = train_tokens(Path(summary["run_dir"]) / "samples.jsonl", task.model, shared)
        result["profile"] = profile(rows, tokens, task.n_params)
    return result


# ---- where our step goes (smollm2) ----

PROFILED = ["timing/generate_s", "timing/logprobs_s", "timing/train_s", "timing/sync_s", "train/forward_s",
            "train/backward_s", "train/optimizer_s"]


def train_tokens(samples_jsonl: Path, model: Path, shared_prompts: bool) -> dict[int, int]:
    """Per step, the token positions our train phase runs (module docstring: T of the FLOP rate), from
    samples.jsonl holding every sample (logging.samples_per_step=32). A row's prompt is the rendered text, whose
    tokens are its ids (rlhf/data.py tokenizes it without adding special tokens); completion_tokens include the
    final EOS. The batch keeps a group's samples together, and a micro-batch of 16 holds 4 whole groups of 4, so
    with the shared prompt forward each group's prompt runs once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt_len: dict[str, int] = {}
    groups: dict[tuple[int, int], list[dict]] = {}
    for line in samples_jsonl.read_text().splitlines():
        row = json.loads(line)
        if row["prompt"] not in prompt_len:
            prompt_len[row["prompt"]] = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        groups.setdefault((row["step"], row["prompt_index"]), []).append(row)
    tokens: dict[int, int] = {}
    for (step, _), rows in groups.items():
        p, completions = prompt_len[rows[0]["prompt"]], [r["completion_tokens"] for r in rows]
        run = (p if shared_prompts else p * len(rows)) + sum(c - 1 for c in completions)
        tokens[step] = tokens.get(step, 0) + run
    return tokens


def profile(rows: list[dict], tokens: dict[int, int], n_params: int) -> dict:
    """Medians over steps 2..N of our phases (PROFILED) and of the train phase's FLOP rate, 6 N T / train_s."""
    steady = [r for r in rows[1:] if r["step"] in tokens]  # step 1 is warm-up
    rates = [6 * n_params * tokens[r["step"]] / r["timing/train_s"] for r in steady]
    return {"phases_median_s": {k: statistics.median(r.get(k, 0.0) for r in steady) for k in PROFILED},
            "train_tokens_median": statistics.median(tokens[r["step"]] for r in steady),
            "train_flops_per_s": statistics.median(rates)}


def cpu_fp32_peak(flops_per_cycle: float | None = None) -> dict:
    """The cores' fp32 peak from /proc/cpuinfo: physical cores this process may run on x "cpu MHz" x FLOPs per
    cycle (2 FMA units x SIMD lanes x 2 FLOPs per FMA; module docstring), with the flags that decided it."""
    procs = [dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
             for block in Path("/proc/cpuinfo").read_text().strip().split("\n\n")]
    usable = os.sched_getaffinity(0)
    procs = [p for p in procs if int(p["processor"]) in usable]
    cores = len({(p.get("physical id", "0"), p.get("core id", p["processor"])) for p in procs})
    ghz = max(float(p.get("cpu MHz", "nan")) for p in procs) / 1000
    flags, vendor = set(procs[0].get("flags", "").split()), procs[0].get("vendor_id", "")
    found = sorted(f for f in ("avx512f", "avx2", "fma", "avx512_vp2intersect") if f in flags)
    if "avx512f" in flags and not (vendor == "AuthenticAMD" and "avx512_vp2intersect" not in flags):
        lanes, isa = 16, "AVX-512 FMA"
    elif "avx512f" in flags:
        lanes, isa = 8, "AVX-512 FMA on 256-bit units (AMD Zen 4)"
    elif "avx2" in flags and "fma" in flags:
        lanes, isa = 8, "AVX2 FMA"
    else:
        lanes, isa = 4, "no FMA flags: SSE, 4 lanes"
    per_cycle = flops_per_cycle or 2 * lanes * 2
    return {"cores": cores, "ghz": ghz, "vendor": vendor, "model": procs[0].get("model name", ""),
            "flags_found": found, "isa": isa if not flops_per_cycle else "--peak-flops-per-cycle",
            "flops_per_cycle": per_cycle, "peak_flops_per_s": cores * ghz * 1e9 * per_cycle}


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


def report_profile(size: str, res: dict[str, list[dict]], peak: dict) -> dict:
    """Our phases and the train phase's FLOP rate against the cores' fp32 peak (module docstring), TRL's step
    time, and issue 17's target (>= 2x TRL's completions/s, reward gain no worse); medians over seeds."""
    print(f"CPU: {peak['model'] or peak['vendor']}, {peak['cores']} cores x {peak['ghz']:.2f} GHz x "
          f"{peak['flops_per_cycle']:g} FLOPs/cycle ({peak['isa']}; flags found: {', '.join(peak['flags_found'])}) "
          f"= {peak['peak_flops_per_s'] / 1e9:.1f} GFLOP/s fp32 peak")
    out: dict = {"cpu_fp32_peak_gflops": round(peak["peak_flops_per_s"] / 1e9, 2), "cpu": peak}
    if res["trl"]:
        out["trl_step_s_median"] = round(median_of(res["trl"], "step_s_median"), 3)
        print(f"TRL step, median (2..N): {out['trl_step_s_median']:.2f} s")
    profiles = [r["profile"] for r in res["ours"] if "profile" in r]
    if profiles:
        phases = {k: statistics.median(p["phases_median_s"][k] for p in profiles) for k in PROFILED}
        rate = statistics.median(p["train_flops_per_s"] for p in profiles)
        tokens = statistics.median(p["train_tokens_median"] for p in profiles)
        print("ours, medians (2..N), s: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        print(f"ours, train phase: 6 x N x {tokens:.0f} tokens / train_s = {rate / 1e9:.1f} GFLOP/s, "
              f"{100 * rate / peak['peak_flops_per_s']:.1f} % of the fp32 peak")
        out.update({"ours_phases_median_s": {k: round(v, 3) for k, v in phases.items()},
                    "ours_train_tokens_median": tokens, "ours_train_gflops": round(rate / 1e9, 2),
                    "ours_train_peak_frac": round(rate / peak["peak_flops_per_s"], 4)})
    if res["trl"] and res["ours"]:
        ratio = median_of(res["ours"], "samples_per_s") / median_of(res["trl"], "samples_per_s")
        gain_ok = median_of(res["ours"], "reward_gain") >= median_of(res["trl"], "reward_gain")
        out["target_met"] = ratio >= 2.0 and gain_ok
        print(f"target (issue 17), {size}: completions/s {ratio:.2f}x TRL's (>= 2.00x: {ratio >= 2.0}); reward gain "
              f"no worse than TRL's: {gain_ok} (one seed per side is noisy: --seeds for more)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "50m", "smollm2", "both", "all"], default="both",
                    help="both: tiny and 50m; all: tiny, 50m and smollm2 (the real model)")
    ap.add_argument("--steps", type=int, default=None, help="default: 30 for tiny, 24 for 50m, 10 for smollm2")
    ap.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    ap.add_argument("--out", default=str(REPO / ".cache" / "bench" / "vs_trl"))
    ap.add_argument("--lr-tiny", type=float, default=3e-3)
    ap.add_argument("--lr-50m", type=float, default=1e-3)
    ap.add_argument("--lr-smollm2", type=float, default=2e-5, help="configs/grpo_smollm2_arith.yaml's train.lr")
    ap.add_argument("--smollm2-dir", default=str(REPO / ".cache" / "smollm2"),
                    help="the converted SmolLM2-135M-Instruct; made by `python -m rlhf.models smollm2` if missing")
    ap.add_argument("--trl-checkpointing", action="store_true",
                    help="smollm2: TRL with GRPOConfig's default activation checkpointing (off otherwise, as ours)")
    ap.add_argument("--peak-flops-per-cycle", type=float, default=None,
                    help="smollm2: fp32 FLOPs per cycle per core for the peak (default: from /proc/cpuinfo's flags)")
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
    sizes = SIZES.get(args.size, [args.size])
    print(f"{os.cpu_count()} CPU cores; TRL {'skipped' if args.skip_trl else 'with transformers generate'} "
          "(TRL's vLLM colocate mode fails on CPU at its first weight sync); ours: Ray + vLLM + DeepSpeed, "
          "its own local Ray cluster; one system at a time")

    final: dict = {}
    for size in sizes:
        task = (smollm2_task(Path(args.smollm2_dir).resolve(), args.lr_smollm2, args.trl_checkpointing)
                if size == "smollm2" else peer_task(size, out_root, args.lr_tiny if size == "tiny" else args.lr_50m))
        steps = args.steps or DEFAULT_STEPS[size]
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
                r = (run_trl(task, steps, seed, out) if system == "trl"
                     else run_ours(task, steps, seed, out, args.threads, args.compiled, args.async_pinned))
                res[system].append(r)
                (out / "result.json").write_text(json.dumps(r, indent=1))
                print(f"{size} seed {seed} {system:>4}: {r['samples_per_s']:.1f} completions/s, reward "
                      f"{r['reward_first5']:.3f} -> {r['reward_last5']:.3f}, peak RSS {r['peak_rss_gib']:.2f} GiB "
                      f"(PSS {r['peak_pss_gib']:.2f}), {r['process_wall_s']:.0f} s all in; log in {out}", flush=True)
        result = report(size, task.n_params, steps, task.lr, seeds, res)
        if task.profile:
            result.update(report_profile(size, res, cpu_fp32_peak(args.peak_flops_per_cycle)))
        if size == "tiny":  # the top level; "tiny" comes first
            final.update(result)
        else:
            final[size] = result
    print(json.dumps(final))


if __name__ == "__main__":
    main()
