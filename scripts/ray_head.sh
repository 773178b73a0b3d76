#!/usr/bin/env bash
# A local Ray head for a laptop, bound to 127.0.0.1, token authentication on.
#   bash scripts/ray_head.sh start   # dashboard: http://127.0.0.1:8265, metrics: 127.0.0.1:8080
#   bash scripts/ray_head.sh stop    # stops the head this script started (by its PID), nothing else
set -euo pipefail
source "$(dirname "$0")/env.sh"
PIDFILE=$RLHF_ROOT/.cache/ray-head-${RAY_PORT:-6379}.pid
LOG=$RLHF_ROOT/.cache/ray-head-${RAY_PORT:-6379}.log
mkdir -p "$RLHF_ROOT/.cache"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-start}" in
start)
  if running; then echo "Ray head already running (pid $(cat "$PIDFILE"))"; exit 0; fi
  # --block keeps `ray start` in the foreground as the parent of the head's processes: ending
  # that one PID ends them all, and nobody else's Ray processes are touched.
  nohup ray start --head --block --node-ip-address 127.0.0.1 --port "${RAY_PORT:-6379}" \
    --dashboard-host 127.0.0.1 --dashboard-port "${RAY_DASHBOARD_PORT:-8265}" \
    --metrics-export-port "${RAY_METRICS_PORT:-8080}" --num-cpus "${RAY_NUM_CPUS:-$(nproc)}" \
    --dashboard-agent-listen-port "${RAY_AGENT_PORT:-52365}" --ray-client-server-port "${RAY_CLIENT_PORT:-10001}" \
    --disable-usage-stats >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 60); do
    if ray job list --address "http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}" >/dev/null 2>&1; then
      echo "Ray head up (pid $(cat "$PIDFILE")); dashboard http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}"
      exit 0
    fi
    running || { echo "Ray head failed to start; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
    sleep 1
  done
  echo "Ray head did not answer within 60 s; see $LOG" >&2; exit 1
  ;;
stop)
  if running; then
    pid=$(cat "$PIDFILE"); kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "Ray head stopped (pid $pid)"
  fi
  rm -f "$PIDFILE"
  # `ray stop` would also remove Ray's marker of the current cluster; a stale one makes the next
  # ray.init() try to join a dead head. Remove it only if it names our head's port.
  marker=${RAY_TMPDIR:-/tmp/ray}/ray_current_cluster
  if [ -f "$marker" ] && grep -q ":${RAY_PORT:-6379}\$" "$marker"; then rm -f "$marker"; fi
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
