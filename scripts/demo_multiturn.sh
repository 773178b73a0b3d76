#!/usr/bin/env bash
# Multi-turn GRPO on the tiny model (configs/grpo_tiny_multiturn.yaml), submitted with `ray job submit` to a
# local Ray head: a two-turn dialogue with examples/multiturn/env.py. Builds the chat-template tiny model first.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$RLHF_ROOT"

if [ ! -f .cache/tiny-chat-model/config.json ]; then
  python -m rlhf.tiny_model --out .cache/tiny-chat-model --corpus examples/multiturn/prompts.jsonl --chat
fi

bash scripts/demo_job.sh configs/grpo_tiny_multiturn.yaml .cache/tiny-chat-model "$@"

run_dir=$(ls -td runs/grpo_tiny_multiturn-*/ | head -1)
python - "$run_dir" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "summary.json"))
rows = [json.loads(line) for line in open(sys.argv[1] + "metrics.jsonl")]
print(f"\nreward: first 5 steps {s['reward_first5_mean']:.3f} -> last 5 steps {s['reward_last5_mean']:.3f} "
      f"({s['reward_gain']:+.3f}) over {s['steps']} steps, {s['wall_s']:.0f} s; "
      f"{rows[-1]['env/turns']:.1f} turns per dialogue")
print(f"run directory: {sys.argv[1]}")
sys.exit(0 if s["reward_gain"] > 0 else 1)
PY
