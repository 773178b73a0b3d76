#!/usr/bin/env bash
# The demo: a real GRPO run of a tiny model on the charset task, submitted with `ray job submit` to a
# local Ray head. Builds the model first (no network), streams the job's log, ends with its summary.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$RLHF_ROOT"
DASHBOARD=http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}

if [ ! -f .cache/tiny-model/config.json ]; then
  python -m rlhf.tiny_model --out .cache/tiny-model --corpus examples/charset/prompts.jsonl
fi

started_head=0
if ! ray job list --address "$DASHBOARD" >/dev/null 2>&1; then
  bash scripts/ray_head.sh start
  started_head=1
fi
stop_head() { [ "$started_head" = 1 ] && bash scripts/ray_head.sh stop; return 0; }
trap stop_head EXIT

echo "submitting the GRPO job; watch it at $DASHBOARD"
# The checkout is uploaded minus what .gitignore lists (.venv, .cache, runs); the model and the run
# directory are given as absolute paths because the job runs in Ray's copy of the checkout.
bash scripts/submit.sh -- python -m rlhf.train --config configs/grpo_tiny.yaml \
  model.path="$RLHF_ROOT/.cache/tiny-model" logging.output_dir="$RLHF_ROOT/runs" "$@"

run_dir=$(ls -td runs/grpo_tiny-*/ | head -1)
python - "$run_dir" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "summary.json"))
print(f"\nreward: first 5 steps {s['reward_first5_mean']:.3f} -> last 5 steps {s['reward_last5_mean']:.3f} "
      f"({s['reward_gain']:+.3f}) over {s['steps']} steps, {s['wall_s']:.0f} s, {s['samples_per_s']:.1f} samples/s")
print(f"run directory: {sys.argv[1]}")
sys.exit(0 if s["reward_gain"] > 0 else 1)
PY
