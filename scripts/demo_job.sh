#!/usr/bin/env bash
# One demo job: start a local Ray head unless one answers, submit `python -m rlhf.train` with `ray job submit`
# (scripts/submit.sh), stream its log, stop the head again if this script started it.
#   bash scripts/demo_job.sh CONFIG MODEL_DIR [key=value ...]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$RLHF_ROOT"
config=$1 model=$2
shift 2
DASHBOARD=http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}

started_head=0
if ! ray job list --address "$DASHBOARD" >/dev/null 2>&1; then
  bash scripts/ray_head.sh start
  started_head=1
fi
stop_head() { [ "$started_head" = 1 ] && bash scripts/ray_head.sh stop; return 0; }
trap stop_head EXIT

echo "submitting $config; watch it at $DASHBOARD"
# The checkout is uploaded minus what .gitignore lists (.venv, .cache, runs); the model and the run
# directory are given as absolute paths because the job runs in Ray's copy of the checkout.
bash scripts/submit.sh -- python -m rlhf.train --config "$config" \
  model.path="$RLHF_ROOT/$model" logging.output_dir="$RLHF_ROOT/runs" "$@"
