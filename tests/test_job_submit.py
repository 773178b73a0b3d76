"""`ray job submit` (through scripts/submit.sh, as `make demo` does) to a Ray head started on 127.0.0.1
by scripts/ray_head.sh, with the run's custom metrics read from the node's metrics export port while
the job runs, and the job's status and logs read back over the head's job API.

Status is polled through Ray's JobSubmissionClient (HTTP, in this process), not `ray job status`: each
CLI call starts a Python process that imports Ray, ~1.5 s of a core, and polled every 2 s that took a
third of the machine from the job it was watching (steps of 1 s alone took 2-3 s, more on a slower machine)."""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Ports apart from the defaults, which a developer's head or the tests' own local cluster (its
# dashboard agent takes 52365) may hold: a second agent on 52365 cannot start, and no job can be submitted.
PORTS = {"RAY_PORT": "6391", "RAY_DASHBOARD_PORT": "8277", "RAY_METRICS_PORT": "8097", "RAY_AGENT_PORT": "52391",
         "RAY_CLIENT_PORT": "6392"}


DONE = ("SUCCEEDED", "FAILED", "STOPPED")


# What the test checks (gauges exported while the job runs, the job SUCCEEDED, its log) needs a short job, not a
# long run. The gauges are scraped while the job runs: from the first step's gauges to the job's end, 11 steps and
# the teardown (>= 10 s here, longer on a slower machine) against the metrics agent's 1 s report interval.
# (A finished driver's gauges are not exported any more, so the scrape cannot wait for the job to end.)
STEPS = 12
# Deadlines guard against hangs only: the job's start (runtime env, vLLM and DeepSpeed start-up: ~25 s here, say
# 4x that on a slow or busy machine) plus STEPS at 30 s each (a tiny step takes 0.5-1 s alone here, 5-10 s was
# seen on a slower 2-core machine inside the suite).
JOB_DEADLINE_S = 120 + STEPS * 30


def test_ray_job_submit_runs_the_tiny_job_and_exports_its_metrics(tiny_model, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the client sends the head's token (~/.ray/auth_token)
    env = {**os.environ, **PORTS, "RAY_AUTH_MODE": "token", "RAY_NUM_CPUS": "2",
           "RAY_metrics_report_interval_ms": "1000"}
    address = f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}"
    metrics_url = f"http://127.0.0.1:{PORTS['RAY_METRICS_PORT']}/metrics"
    subprocess.run(["bash", "scripts/ray_head.sh", "start"], cwd=REPO, env=env, check=True, timeout=120)
    try:
        submit = subprocess.run(
            ["bash", "scripts/submit.sh", "--no-wait", "--", "python", "-m", "rlhf.train", "--config",
             "configs/grpo_tiny.yaml", f"model.path={tiny_model}", f"logging.output_dir={tmp_path}",
             "logging.wandb=disabled", f"steps={STEPS}"], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=180)
        assert submit.returncode == 0, submit.stderr
        job = submit.stdout.strip()
        assert job.startswith("raysubmit_"), submit.stdout
        client = JobSubmissionClient(address)

        def status() -> str:
            return client.get_job_status(job).value

        # While the job runs, its gauges appear on the metrics export port, tagged with the run. They reach the
        # port in the metrics agent's reports (every second here), so one scrape may hold some of a step's gauges
        # and not yet the others: poll until all of them are there.
        wanted = ("ray_rlhf_reward_mean", "ray_rlhf_timing_sync_s", "ray_rlhf_sync_logprob_gap")
        exported, deadline = "", time.monotonic() + JOB_DEADLINE_S
        while not all(name in exported for name in wanted):
            assert time.monotonic() < deadline, f"the job did not end within {JOB_DEADLINE_S} s"
            if status() in DONE:
                break
            try:
                exported = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
            except (urllib.error.URLError, TimeoutError):
                exported = ""
            time.sleep(1)
        while status() not in DONE:
            assert time.monotonic() < deadline, f"the job did not end within {JOB_DEADLINE_S} s"
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status() == "SUCCEEDED", logs[-3000:]
        assert f"step {STEPS}/{STEPS}" in logs and "summary: " in logs
        assert re.search(r'ray_rlhf_reward_mean\{[^}]*run="grpo_tiny-', exported), "no rlhf gauge exported"
        assert "ray_rlhf_timing_sync_s" in exported and "ray_rlhf_sync_logprob_gap" in exported
    finally:
        subprocess.run(["bash", "scripts/ray_head.sh", "stop"], cwd=REPO, env=env, timeout=120)
