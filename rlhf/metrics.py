"""The run directory and everything a run reports: console lines, metrics.jsonl, samples.jsonl, summary.json, wandb."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import RunConfig
from rlhf.types import Sample

CONSOLE = [  # (metric key, label, format) for the one-line-per-step console output
    ("reward/mean", "reward", "{:.3f}"),
    ("kl/ref", "kl", "{:.4f}"),
    ("loss/policy", "loss", "{:+.4f}"),
    ("sync/logprob_gap", "gap", "{:.1e}"),
    ("timing/generate_s", "gen", "{:.2f}s"),
    ("timing/reward_s", "rew", "{:.2f}s"),
    ("timing/logprobs_s", "lp", "{:.2f}s"),
    ("timing/train_s", "train", "{:.2f}s"),
    ("timing/sync_s", "sync", "{:.2f}s"),
]


class RayMetrics:
    """Every numeric step metric as a Ray gauge (`ray.util.metrics`), tagged with the run's name.

    The node's metrics agent exports them in Prometheus format on the node's metrics export port
    (`ray start --metrics-export-port`), with Ray's `ray_` prefix: `reward/mean` is
    `ray_rlhf_reward_mean{run="..."}`; the dashboard's Prometheus/Grafana integration scrapes them.
    """

    def __init__(self, run: str):
        self.run = run
        self._gauges: dict[str, Any] = {}

    @staticmethod
    def name(key: str) -> str:
        return "rlhf_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)

    def record(self, metrics: dict[str, float]) -> None:
        from ray.util.metrics import Gauge

        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if key not in self._gauges:
                self._gauges[key] = Gauge(self.name(key), description=key, tag_keys=("run",))
            self._gauges[key].set(float(value), tags={"run": self.run})


def spread_indices(n: int, k: int) -> list[int]:
    """min(k, n) distinct indices evenly spaced over range(n), from 0: floor(i * n / k) for i < min(k, n).

    Deterministic, and spread over the whole batch rather than its first groups: a rollout batch is
    groups of samples_per_prompt, so with k dividing the number of groups (32 samples in groups of 4,
    k = 4: 0, 8, 16, 24) it is the first sample of every (groups / k)-th group. k >= n gives every index.
    """
    k = min(k, n)
    return [i * n // k for i in range(k)]


class RunLog:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = Path(cfg.logging.output_dir).expanduser().resolve() / f"{cfg.name}-{stamp}-{os.getpid()}"
        self.dir.mkdir(parents=True, exist_ok=False)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._metrics = open(self.dir / "metrics.jsonl", "a")
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.wandb = self._init_wandb()
        self._samples_table: Any = None  # wandb's `samples` table, created with its first rows
        self.ray_metrics = RayMetrics(self.dir.name)
        print(f"run directory: {self.dir}", flush=True)

    def _init_wandb(self) -> Any:
        mode = self.cfg.logging.wandb
        if mode == "disabled":
            return None
        import wandb

        # Offline runs land in the run directory; `wandb sync <dir>/wandb/offline-run-*` uploads them.
        # The API key comes from the environment or ~/.netrc and is never written here.
        return wandb.init(project=self.cfg.logging.wandb_project, name=self.dir.name, dir=str(self.dir),
                          mode=mode, config=self.cfg.to_dict(), reinit="finish_previous")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.rows.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.ray_metrics.record(metrics)
        done = round(20 * step / self.cfg.steps)
        parts = [f"[{'#' * done}{'.' * (20 - done)}] step {step}/{self.cfg.steps}"]
        parts += [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in CONSOLE if k in metrics]
        print(" | ".join(parts), flush=True)

    def log_samples(self, step: int, samples: list[Sample]) -> None:
        """logging.samples_per_step of the step's trained samples (spread_indices over the batch), one JSON
        object per sample appended to samples.jsonl and, with wandb on, as rows of the `samples` table."""
        picked = [samples[i] for i in spread_indices(len(samples), self.cfg.logging.samples_per_step)]
        if not picked:
            return
        rows = [sample_row(step, s) for s in picked]
        with open(self.dir / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.wandb is not None:
            import wandb

            if self._samples_table is None:
                # One INCREMENTAL table, logged every step: W&B's docs recommend it for rows added during
                # training. Each log uploads only the new rows (re-logging a MUTABLE table uploads it
                # whole every step) and the UI can step through the increments. Components vary per
                # sample (shaping terms), so they travel as one JSON string column.
                self._samples_table = wandb.Table(columns=list(rows[0]), log_mode="INCREMENTAL")
            for r in rows:
                self._samples_table.add_data(*[json.dumps(v) if isinstance(v, dict) else v for v in r.values()])
            self.wandb.log({"samples": self._samples_table}, step=step)

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        wall = time.time() - self.t0
        rewards = [r["reward/mean"] for r in self.rows]
        k = min(5, len(rewards))
        samples = sum(r.get("rollout/samples", 0) for r in self.rows)
        summary = {
            "steps": len(self.rows),
            "reward_first5_mean": sum(rewards[:k]) / k if k else math.nan,
            "reward_last5_mean": sum(rewards[-k:]) / k if k else math.nan,
            "wall_s": wall,
            "samples_per_s": samples / wall if wall > 0 else math.nan,
            "run_dir": str(self.dir),
            **extra,
        }
        summary["reward_gain"] = summary["reward_last5_mean"] - summary["reward_first5_mean"]
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self._metrics.close()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()
        print("summary: " + json.dumps(summary), flush=True)
        print(f"run directory: {self.dir}", flush=True)
        return summary


def sample_row(step: int, s: Sample) -> dict[str, Any]:
    """One line of samples.jsonl (and one row of the wandb table, in this column order)."""
    return {"step": step, "prompt_index": s.prompt.index, "prompt": s.prompt.text, "completion": s.text,
            "reward": s.reward, "reward_components": dict(s.reward_components),
            "completion_tokens": len(s.completion_ids), "truncated": s.truncated,
            "policy_version": s.policy_version}


def _jsonable(v: Any) -> Any:
    return float(v) if hasattr(v, "item") else v
