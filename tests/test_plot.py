"""rlhf-plot on a fake run directory: which PNGs are written, that they are PNGs, and its errors."""

import json
import math
import struct
import subprocess
import sys

import pytest

from rlhf.plot import main, plot_run, read_metrics, series
from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_rows(steps=10, eval_every=5):
    """Rows shaped like the driver's: loss/value missing on odd steps, eval/* every eval_every steps,
    a NaN in kl/ref at step 4, a null reward/std at step 7."""
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "reward/mean": 0.1 + 0.05 * step, "reward/std": 0.1, "kl/ref": 0.01 * step,
               "sync/logprob_gap": 3e-7, "loss/policy": 0.01 * (-1) ** step, "timing/generate_s": 0.4,
               "timing/reward_s": 0.01, "timing/train_s": 0.3, "timing/sync_s": 0.05, "timing/step_s": 0.8}
        if step % 2 == 0:
            row["loss/value"] = 1.0 / step
        if step % eval_every == 0:
            row.update({"eval/reward/mean": 0.2 + 0.04 * step, "eval/completion_len": 20.0, "timing/eval_s": 0.2})
            row["timing/step_s"] += 0.2
        rows.append(row)
    rows[3]["kl/ref"] = math.nan
    rows[6]["reward/std"] = None
    return rows


def write_run(path, rows=None, text=None):
    path.mkdir(parents=True, exist_ok=True)
    if text is None:
        text = "".join(json.dumps(r) + "\n" for r in (fake_rows() if rows is None else rows))
    (path / "metrics.jsonl").write_text(text)
    return path


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the magic
    assert width >= 400 and height >= 200 and len(data) > 10_000, (path, width, height, len(data))


def test_read_metrics_keeps_nan_and_null(tmp_path):
    rows = read_metrics(write_run(tmp_path / "run"))
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert math.isnan(rows[3]["kl/ref"]) and rows[6]["reward/std"] is None


def test_series_drops_missing_null_and_nan():
    rows = [{"step": 1, "x": 1.0}, {"step": 2}, {"step": 3, "x": None}, {"step": 4, "x": math.nan},
            {"step": 5, "x": math.inf}, {"step": 6, "x": 2}]
    assert series(rows, "x") == ([1, 6], [1.0, 2.0])


def test_plot_run_writes_one_png_per_panel(tmp_path):
    run = write_run(tmp_path / "run")
    paths = plot_run(run)
    assert [p.name for p in paths] == ["reward.png", "kl.png", "losses.png", "eval.png", "timing.png"]
    for p in paths:
        assert p.parent == run / "plots"
        assert_png(p)


def test_out_dir(tmp_path):
    paths = plot_run(write_run(tmp_path / "run"), tmp_path / "elsewhere" / "plots")
    assert {p.parent for p in paths} == {tmp_path / "elsewhere" / "plots"}
    assert not (tmp_path / "run" / "plots").exists()


def test_panels_without_data_are_not_written(tmp_path):
    rows = fake_rows(eval_every=100)  # no eval step
    for r in rows:
        del r["sync/logprob_gap"]
        r["kl/ref"] = None  # present on every row, but never a number
    paths = plot_run(write_run(tmp_path / "run", rows))
    assert [p.name for p in paths] == ["reward.png", "losses.png", "timing.png"]
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == ["losses.png", "reward.png", "timing.png"]


def test_kl_panel_with_zeros_on_log_axis(tmp_path):
    rows = [{"step": s, "kl/ref": 0.0 if s == 1 else 0.01 * s, "loss/policy": 0.0} for s in range(1, 6)]
    assert [p.name for p in plot_run(write_run(tmp_path / "run", rows))] == ["kl.png", "losses.png"]
    rows = [{"step": s, "kl/ref": 0.0} for s in range(1, 6)]  # nothing positive: a linear axis, still a plot
    assert [p.name for p in plot_run(write_run(tmp_path / "zeros", rows))] == ["kl.png"]


def test_bad_line_names_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in fake_rows()[:2]] + ['{"step": 3, "reward/mean": 0.', json.dumps({"step": 4})]
    run = write_run(tmp_path / "run", text="\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not JSON"):
        read_metrics(run)


def test_row_without_step_is_an_error(tmp_path):
    run = write_run(tmp_path / "run", text='{"step": 1}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: expected a JSON object"):
        read_metrics(run)


def test_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope/metrics\.jsonl"):
        read_metrics(tmp_path / "nope")


def test_run_without_steps(tmp_path):
    run = write_run(tmp_path / "run", text="\n")
    with pytest.raises(ValueError, match="the run has no logged steps"):
        plot_run(run)
    assert not (run / "plots").exists()


def test_cli_prints_the_written_paths(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main([str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "plots" / f"{n}.png") for n in ["reward", "kl", "losses", "eval", "timing"]]
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 5


def test_cli_error_exits_2(tmp_path, capsys):
    assert main([str(write_run(tmp_path / "run", text="not json\n"))]) == 2
    assert "metrics.jsonl:1: not JSON" in capsys.readouterr().err


def test_import_does_not_load_matplotlib():
    code = "import sys, rlhf.plot; assert 'matplotlib' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
