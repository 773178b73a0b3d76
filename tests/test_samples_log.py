"""samples.jsonl and wandb's `samples` table: which samples of a step are written, and what a row holds."""

import json

import pytest

from rlhf.config import ConfigError, load_config
from rlhf.metrics import RunLog, spread_indices
from rlhf.types import Prompt, Sample
from tests.conftest import REPO

TINY = REPO / "configs" / "grpo_tiny.yaml"


def fake_samples(groups=4, group_size=2):
    """groups x group_size samples, flattened group by group as the driver's batch is; sample j of
    prompt p has reward p + j / 10, 3 + j completion tokens, and a shaping term on odd j."""
    out = []
    for p in range(groups):
        prompt = Prompt(index=10 + p, text=f"prompt {p}", ids=[1, 2], row={})
        for j in range(group_size):
            components = {"f.py:score": p + j / 10} | ({"overlong": -0.5} if j % 2 else {})
            out.append(Sample(prompt=prompt, completion_ids=list(range(3 + j)), rollout_logprobs=[0.0] * (3 + j),
                              text=f"completion {p}.{j}", truncated=bool(j % 2), policy_version=p // 2, generator=0,
                              reward=p + j / 10, reward_components=components))
    return out


def run_log(tmp_path, *overrides):
    cfg = load_config(TINY, [f"logging.output_dir={tmp_path}", "logging.wandb=disabled", *overrides])
    return RunLog(cfg)


def read_rows(log):
    return [json.loads(line) for line in (log.dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n, k, expected", [
    (32, 4, [0, 8, 16, 24]),  # the tiny config: the first sample of every other group of 4
    (10, 3, [0, 3, 6]),  # floor(0 * 10 / 3), floor(10 / 3), floor(20 / 3)
    (8, 8, list(range(8))),
    (3, 5, [0, 1, 2]),  # more asked than there are: every sample once
    (7, 1, [0]),
    (7, 0, []),
    (0, 4, []),
])
def test_spread_indices(n, k, expected):
    assert spread_indices(n, k) == expected


def test_rows_hold_the_spread_samples_with_every_field(tmp_path):
    log = run_log(tmp_path, "logging.samples_per_step=4")
    samples = fake_samples(groups=4, group_size=2)  # 8 samples: indices 0, 2, 4, 6 = first of each group
    log.log_samples(1, samples)
    log.log_samples(2, samples[:3])  # fewer samples than asked for: each once (0, 1, 2)
    log.finish({})
    rows = read_rows(log)
    assert [(r["step"], r["prompt_index"]) for r in rows] == [(1, 10), (1, 11), (1, 12), (1, 13),
                                                             (2, 10), (2, 10), (2, 11)]
    assert rows[0] == {"step": 1, "prompt_index": 10, "prompt": "prompt 0", "completion": "completion 0.0",
                       "reward": 0.0, "reward_components": {"f.py:score": 0.0}, "completion_tokens": 3,
                       "truncated": False, "policy_version": 0}
    second = rows[5]  # step 2, sample 1: the odd one, with the shaping term
    assert second["completion"] == "completion 0.1" and second["completion_tokens"] == 4 and second["truncated"]
    assert second["reward_components"] == {"f.py:score": 0.1, "overlong": -0.5}
    assert rows[3]["policy_version"] == 1 and rows[3]["reward"] == 3.0


def test_zero_samples_per_step_writes_nothing(tmp_path):
    log = run_log(tmp_path, "logging.samples_per_step=0")
    log.log_samples(1, fake_samples())
    log.finish({})
    assert not (log.dir / "samples.jsonl").exists()


def test_negative_samples_per_step_names_the_key():
    with pytest.raises(ConfigError, match=r"logging.samples_per_step: must be >= 0"):
        load_config(TINY, ["logging.samples_per_step=-1"])


def test_offline_wandb_gets_the_same_rows_as_a_table(tmp_path, monkeypatch):
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = run_log(tmp_path / "runs", "logging.wandb=offline", "logging.samples_per_step=2")
    try:
        samples = fake_samples()
        log.log_samples(1, samples)
        log.log_samples(2, samples)
    finally:
        log.finish({})  # wandb.finish(): the offline run is written out and its service stops
    written = read_rows(log)
    (run,) = (log.dir / "wandb").glob("offline-run-*")
    # An INCREMENTAL table writes one file per log, holding the rows that log added.
    tables = sorted((run / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 2
    got = [dict(zip(t["columns"], row)) for t in map(json.loads, (p.read_text() for p in tables)) for row in t["data"]]
    assert len(got) == len(written) == 4
    for table_row, line in zip(got, written):
        assert table_row == {**line, "reward_components": json.dumps(line["reward_components"])}
