#!/usr/bin/env bash
# `ray job submit` of this checkout, retried while a just-started head's job agent is still coming up
# (the head answers "No available agent to submit job" and creates no job). Then, unless --no-wait,
# streams the job's log and exits 0 only if the job succeeded. With --no-wait, prints the job id.
#   bash scripts/submit.sh [--no-wait] -- python -m rlhf.train --config configs/grpo_tiny.yaml ...
set -euo pipefail
source "$(dirname "$0")/env.sh"
ADDRESS=${RAY_JOB_ADDRESS:-http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}}
wait=1
if [ "${1:-}" = "--no-wait" ]; then wait=0; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
out=""
for attempt in $(seq 1 20); do
  if out=$(ray job submit --address "$ADDRESS" --no-wait --working-dir "$RLHF_ROOT" -- "$@" 2>&1); then break; fi
  if ! grep -q "No available agent" <<<"$out"; then echo "$out" >&2; exit 1; fi
  echo "the head's job agent is still starting; retrying ($attempt/20)" >&2
  sleep 3
done
job=$(grep -oE "raysubmit_[A-Za-z0-9]+" <<<"$out" | head -1 || true)
if [ -z "$job" ]; then echo "$out" >&2; exit 1; fi
echo "submitted $job; watch it at $ADDRESS" >&2
if [ "$wait" = 0 ]; then echo "$job"; exit 0; fi
ray job logs --address "$ADDRESS" --follow "$job" || true
status=$(ray job status --address "$ADDRESS" "$job" 2>&1)
echo "$status" | tail -2 >&2
grep -qi "succeeded" <<<"$status"
