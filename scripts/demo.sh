#!/usr/bin/env bash
# The demo: a real GRPO run of a tiny model on the charset task, submitted with `ray job submit` to a
# local Ray head. Builds the model first (no network), streams the job's log, ends with its summary.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$RLHF_ROOT"

if [ ! -f .cache/tiny-model/config.json ]; then
  python -m rlhf.tiny_model --out .cache/tiny-model --corpus examples/charset/prompts.jsonl
fi

bash scripts/demo_job.sh configs/grpo_tiny.yaml .cache/tiny-model "$@"

run_dir=$(ls -td runs/grpo_tiny-*/ | head -1)
python - "$run_dir" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "summary.json"))
print(f"\nreward: first 5 steps {s['reward_first5_mean']:.3f} -> last 5 steps {s['reward_last5_mean']:.3f} "
      f"({s['reward_gain']:+.3f}) over {s['steps']} steps, {s['wall_s']:.0f} s, {s['samples_per_s']:.1f} samples/s")
print(f"run directory: {sys.argv[1]}")
sys.exit(0 if s["reward_gain"] > 0 else 1)
PY
