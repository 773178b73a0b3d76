"""PNG curves of a run from its metrics.jsonl: `rlhf-plot RUN_DIR [--out DIR]`.

One PNG per panel group, each written only if the run logged any of its keys:

- reward.png: reward/mean with a +-reward/std band; eval reward means (eval/reward/mean, eval/<fn>/mean) as markers;
- kl.png: kl/* and sync/logprob_gap on a log axis;
- losses.png: one plot per loss/* key (the policy and value losses differ by orders of magnitude);
- eval.png: one plot per eval/* key;
- timing.png: seconds per step as bars stacked by phase (timing/*_s), with timing/step_s as a line.

Keys are discovered from the data; only the prefixes above are fixed. Missing, null, NaN and infinite
values are left out of the curves. matplotlib is imported only when plotting, and draws with its Agg
canvas directly (no pyplot), so plotting neither needs a display nor changes the caller's backend.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

Series = tuple[list[float], list[float]]  # (steps, values), finite values only


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl; blank lines are skipped, anything else that is not a JSON
    object with a "step" is an error naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run directory?)")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"step\"")
            rows.append(row)
    return rows


def series(rows: list[dict[str, Any]], key: str) -> Series:
    """Steps and values of `key` on the rows where it is a finite number."""
    xs, ys = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(row["step"])
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes the run's panels as PNGs into out_dir (default RUN_DIR/plots/) and returns their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: the run has no logged steps")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)

    keys = dict.fromkeys(k for row in rows for k in row if k != "step")  # in order of first appearance
    data = {k: s for k in keys if (s := series(rows, k))[0]}  # the keys with at least one finite value
    eval_keys = [k for k in data if k.startswith("eval/")]
    panels = {
        "reward": (_reward, ["reward/mean"] + [k for k in eval_keys if _is_reward(k)]),
        "kl": (_log_lines, [k for k in data if k.startswith("kl/") or k == "sync/logprob_gap"]),
        "losses": (_small_multiples, [k for k in data if k.startswith("loss/")]),
        "eval": (_small_multiples, eval_keys),
        "timing": (_timing, [k for k in data if k.startswith("timing/") and k.endswith("_s")]),
    }
    written = []
    for name, (draw, keys) in panels.items():
        keys = [k for k in keys if k in data]
        if not keys:
            continue
        fig = draw(data, keys)
        fig.suptitle(f"{run_dir.resolve().name}: {name}")
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def _is_reward(eval_key: str) -> bool:
    return eval_key.startswith("eval/reward/") or eval_key.endswith("/mean")


def _figure(rows: int = 1) -> tuple[Any, list[Any]]:
    """A figure on matplotlib's Agg canvas with `rows` plots sharing the step axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 1.2 + 2.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0].tolist()
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _reward(data: dict[str, Series], keys: list[str]) -> Any:
    fig, (ax,) = _figure()
    if "reward/mean" in data:
        xs, ys = data["reward/mean"]
        ax.plot(xs, ys, label="reward/mean")
        if "reward/std" in data:
            std = dict(zip(*data["reward/std"]))
            band = [(x, y, std[x]) for x, y in zip(xs, ys) if x in std]
            ax.fill_between([x for x, _, _ in band], [y - s for _, y, s in band], [y + s for _, y, s in band],
                            alpha=0.2, label="\u00b1 reward/std")
    for key in keys:
        if key != "reward/mean":
            ax.plot(*data[key], "o--", markersize=5, label=key)
    ax.set_ylabel("reward")
    ax.legend(fontsize="small")
    return fig


def _log_lines(data: dict[str, Series], keys: list[str]) -> Any:
    """Lines on a log axis; values <= 0 cannot be drawn there and are left out (linear axis if none is > 0)."""
    fig, (ax,) = _figure()
    positive = {k: [(x, y) for x, y in zip(*data[k]) if y > 0] for k in keys}
    log = any(positive.values())
    for key in keys:
        points = positive[key] if log else list(zip(*data[key]))
        ax.plot([x for x, _ in points], [y for _, y in points], ".-", label=key)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    return fig


def _small_multiples(data: dict[str, Series], keys: list[str]) -> Any:
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        ax.plot(*data[key], ".-")
        ax.set_title(key, fontsize="small", loc="right")
    return fig


def _timing(data: dict[str, Series], keys: list[str]) -> Any:
    """Phases as stacked bars, one per step (a phase not run on a step, e.g. eval, counts 0 there); the step's
    wall time as a line: the gap between the bars and the line is time outside the timed phases."""
    fig, (ax,) = _figure()
    phases = [k for k in keys if k != "timing/step_s"]
    steps = sorted({x for k in phases for x in data[k][0]})
    bottom = [0.0] * len(steps)
    for key in phases:
        seconds = dict(zip(*data[key]))
        height = [seconds.get(x, 0.0) for x in steps]
        ax.bar(steps, height, width=1.0, bottom=bottom, linewidth=0, alpha=0.8,
               label=key.removeprefix("timing/").removesuffix("_s"))
        bottom = [b + h for b, h in zip(bottom, height)]
    if "timing/step_s" in data:
        ax.plot(*data["timing/step_s"], "k.-", label="step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-plot", description="Write PNG curves of a run from its metrics.jsonl.")
    ap.add_argument("run_dir", type=Path, help="a run directory (runs/<name>-<time>-<pid>/)")
    ap.add_argument("--out", type=Path, help="where to write the PNGs (default RUN_DIR/plots/)")
    args = ap.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (OSError, ValueError) as e:
        print(f"rlhf-plot: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
