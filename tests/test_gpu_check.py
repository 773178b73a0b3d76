"""scripts/gpu_check.py's orchestration with fake stages, on CPU: statuses, the summary, timeouts that
cost one stage, skipping for missing GPUs or budget, the memory trace. The stages themselves need GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)
Stage, run_check = gpu_check.Stage, gpu_check.run_check

BODIES = {  # what each fake stage's process does
    "fine": "report('ok', throughput=42.0); print('all good')",
    "broken": "print('about to fail'); raise RuntimeError('the engine refused')",
    "silent": "pass",  # exits 0 without a result
    "untestable": "report('skipped', 'not testable: NCCL needs two GPUs')",
    # hangs, with a child of its own that would outlive it unless the whole process group is ended
    "hang": "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print('hanging', flush=True); time.sleep(60)",
}


def fake_command(stage, out: Path) -> list[str]:
    prelude = ("import json, os\n"
               "def report(status='ok', reason='', **figures):\n"
               f"    open(os.environ[{gpu_check.RESULT_ENV!r}], 'w').write(json.dumps("
               "{'status': status, 'reason': reason, 'figures': figures}))\n")
    return [sys.executable, "-c", prelude + BODIES[stage.name]]


def by_name(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["stages"]}


def test_statuses_figures_and_log_tails_land_in_summary_json(tmp_path):
    stages = [Stage("fine", 0, 30, "a stage that works"), Stage("broken", 0, 30, "a stage that raises"),
              Stage("silent", 0, 30, "a stage that reports nothing"), Stage("untestable", 0, 30, "one GPU")]
    summary = run_check(stages, tmp_path, gpus=1, budget_s=120, command=fake_command)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    s = by_name(summary)
    assert s["fine"]["status"] == "ok" and s["fine"]["figures"] == {"throughput": 42.0}
    assert "all good" in s["fine"]["log_tail"] and s["fine"]["seconds"] < 30
    assert s["broken"]["status"] == "failed" and s["broken"]["reason"] == "exit status 1"
    assert "RuntimeError: the engine refused" in s["broken"]["log_tail"]
    assert (tmp_path / "logs" / "broken.log").exists()
    assert s["silent"]["status"] == "failed" and "reported no result" in s["silent"]["reason"]
    assert s["untestable"]["status"] == "skipped" and s["untestable"]["reason"] == "not testable: NCCL needs two GPUs"
    assert [st["name"] for st in summary["stages"]] == ["fine", "broken", "silent", "untestable"]


def test_a_hanging_stage_costs_its_own_timeout_and_its_children_die_with_it(tmp_path):
    stages = [Stage("hang", 0, 1.5, "hangs"), Stage("fine", 0, 30, "runs after it")]
    t0 = time.monotonic()
    summary = run_check(stages, tmp_path, gpus=0, budget_s=120, command=fake_command)
    elapsed = time.monotonic() - t0
    s = by_name(summary)
    assert s["hang"]["status"] == "failed" and s["hang"]["reason"] == "timed out after 1.5 s (killed)"
    assert 1.5 <= s["hang"]["seconds"] < 8 and "hanging" in s["hang"]["log_tail"]
    assert s["fine"]["status"] == "ok"
    assert elapsed < 15  # the hang's 60 s never happen
    # the grandchild (sleep 60) went with the stage's process group: nothing of it is left running
    mine = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    sleepers = []
    for p in mine:
        try:
            if b"time.sleep(60)" in (p / "cmdline").read_bytes() and int(p.name) != os.getpid():
                sleepers.append(p.name)
        except OSError:
            continue
    assert not sleepers


def test_stages_needing_more_gpus_are_skipped_saying_so_and_nccl_says_not_testable(tmp_path):
    stages = [Stage("fine", 1, 30, "one GPU"), Stage("nccl_push", 2, 30, "two GPUs"), Stage("tp2", 3, 30, "three")]
    summary = run_check(stages, tmp_path, gpus=1, budget_s=120, command=fake_command)
    s = by_name(summary)
    assert s["fine"]["status"] == "ok"
    assert s["nccl_push"]["status"] == "skipped"
    assert s["nccl_push"]["reason"] == "needs 2 GPUs, the machine has 1: not testable here"
    assert s["tp2"]["reason"] == "needs 3 GPUs, the machine has 1"


def test_the_budget_bounds_the_whole_check(tmp_path):
    stages = [Stage("hang", 0, 100, "would take 60 s"), Stage("fine", 0, 30, "no budget left for it")]
    summary = run_check(stages, tmp_path, gpus=0, budget_s=2.0, command=fake_command, min_stage_s=1.0)
    s = by_name(summary)
    assert s["hang"]["reason"] == "timed out after 2 s (killed)"  # its timeout cut to the budget left
    assert s["fine"]["status"] == "skipped" and s["fine"]["reason"].startswith("not run: 0 s of the 2 s budget left")
    assert summary["total_s"] < 10


def test_the_memory_trace_samples_while_stages_run_and_gives_each_its_peak(tmp_path):
    used = iter(range(1, 10_000))
    stages = [Stage("hang", 0, 0.6, "samples taken meanwhile"), Stage("fine", 0, 30, "")]
    summary = run_check(stages, tmp_path, gpus=1, budget_s=60, command=fake_command,
                        sampler=lambda: [float(next(used)), 5.0], sampler_kind="fake", period_s=0.05)
    rows = summary["gpu_memory"]
    assert summary["memory_trace"] == "fake" and len(rows) >= 5
    assert {"t", "stage", "used_mib"} <= set(rows[0]) and len(rows[0]["used_mib"]) == 2
    hang = [r for r in rows if r["stage"] == "hang"]
    assert hang and by_name(summary)["hang"]["figures"]["gpu_peak_used_mib"] == max(r["used_mib"][0] for r in hang)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)


def test_every_listed_stage_has_a_body_and_the_cli_refuses_unknown_stages(tmp_path, capsys):
    handled = {"probe", "engine", "ipc_push", "nccl_push", *gpu_check.RUNS}
    assert [s.name for s in gpu_check.STAGES] == ["probe", "engine", "ipc_push", "nccl_push", "colocated",
                                                  "nccl_run", "tp2"]
    assert {s.name for s in gpu_check.STAGES} == handled
    assert sum(s.timeout_s for s in gpu_check.STAGES if s.gpus <= 1) > 540  # one GPU: the budget bounds them
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--only", "probe,warp_drive"])
    assert "unknown stage(s) ['warp_drive']" in capsys.readouterr().err


def test_the_run_stages_configs_pass_the_plans_gpu_checks(tiny_model, tmp_path):
    """What the run stages ask for is refused by nothing the plan checks on a GPU (shares, memory)."""
    from rlhf.config import load_config
    from rlhf.plan import ModelShape, build_plan, check

    (tmp_path / "tiny-model").symlink_to(tiny_model)
    shape = ModelShape.of(str(tiny_model))
    for name, extra in gpu_check.RUNS.items():
        cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", gpu_check.run_overrides(tmp_path, name, extra, 139.8))
        assert cfg.model.dtype == "bfloat16" and cfg.train.zero_stage == 2 and cfg.steps == 3
        check(build_plan(cfg, "cuda", shape), [], cfg, "cuda")  # includes check_gpu_sharing
    colocated = load_config(REPO / "configs" / "grpo_tiny.yaml",
                            gpu_check.run_overrides(tmp_path, "colocated", gpu_check.RUNS["colocated"], 139.8))
    assert colocated.resources.colocate and colocated.uses_reference and colocated.weight_sync.verify
