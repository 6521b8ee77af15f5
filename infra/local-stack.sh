#!/usr/bin/env bash
# A development stack on loopback: one Prefect server (API + UI) and one Ray head.
#
#   infra/local-stack.sh start    # prints the exports to paste (or: eval "$(infra/local-stack.sh start)")
#   infra/local-stack.sh status
#   infra/local-stack.sh stop
#
# Then: python infra/prefect/work_pools.py local
#       prefect --no-prompt deploy --all
#       prefect worker start --pool gleaner-cpu
#
# Settings (env): PREFECT_PORT (4200), RAY_PORT (6380), RAY_CLIENT_PORT (10001),
# RAY_NUM_CPUS (all), GLEANER_STACK_DIR (~/.gleaner/stack), PYTHON (the python
# that has gleaner installed; default: .venv/bin/python beside this repo, else python3).
# Everything listens on 127.0.0.1 only. Progress messages go to stderr, exports to stdout.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
STACK_DIR="${GLEANER_STACK_DIR:-$HOME/.gleaner/stack}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
RAY_PORT="${RAY_PORT:-6380}"
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
BIN="$(dirname "$(command -v "$PYTHON")")"
API_URL="http://127.0.0.1:${PREFECT_PORT}/api"

say() { echo "local-stack: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds="$1" what="$2"; shift 2
  for _ in $(seq 1 "$((seconds * 2))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  say "$what did not come up in ${seconds}s; logs in $STACK_DIR"
  return 1
}

prefect_healthy() { "$PYTHON" -c "import httpx,sys; sys.exit(httpx.get('$API_URL/health', timeout=2).status_code != 200)"; }

start() {
  mkdir -p "$STACK_DIR"
  if alive "$STACK_DIR/prefect.pid"; then
    say "prefect server already running (pid $(cat "$STACK_DIR/prefect.pid"))"
  else
    say "starting prefect server on 127.0.0.1:$PREFECT_PORT"
    PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$STACK_DIR/prefect-home" \
      setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" \
      >"$STACK_DIR/prefect.log" 2>&1 </dev/null &
    echo $! >"$STACK_DIR/prefect.pid"
  fi
  if alive "$STACK_DIR/ray.pid"; then
    say "ray head already running (pid $(cat "$STACK_DIR/ray.pid"))"
  else
    say "starting ray head on 127.0.0.1:$RAY_PORT (client port $RAY_CLIENT_PORT)"
    # --block keeps `ray start` in the foreground as the owner of the head's processes:
    # stopping it stops this head only (never `ray stop`, which ends every Ray on the machine).
    local cpus=()
    [ -n "${RAY_NUM_CPUS:-}" ] && cpus=(--num-cpus "$RAY_NUM_CPUS")
    RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PREFECT_API_URL="$API_URL" \
      setsid "$BIN/ray" start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
      --ray-client-server-port "$RAY_CLIENT_PORT" --include-dashboard false \
      --dashboard-port "${RAY_DASHBOARD_PORT:-8265}" \
      --disable-usage-stats "${cpus[@]}" \
      >"$STACK_DIR/ray.log" 2>&1 </dev/null &
    echo $! >"$STACK_DIR/ray.pid"
  fi
  wait_for 120 "prefect server" prefect_healthy
  wait_for 120 "ray head" grep -q "Ray runtime started" "$STACK_DIR/ray.log"
  say "ready. Prefect UI: http://127.0.0.1:$PREFECT_PORT"
  echo "export PREFECT_API_URL=$API_URL"
  echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT"
  echo "export RAY_AUTH_MODE=disabled"
  echo "export GLEANER_CHECKOUT=$REPO"
}

stop_one() {  # stop_one NAME: TERM the owner (it cleans up its children), then its session
  local pidfile="$STACK_DIR/$1.pid"
  if alive "$pidfile"; then
    local pid; pid="$(cat "$pidfile")"
    say "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    # anything the owner left behind in its own session (started with setsid: pgid = pid)
    kill -TERM -- "-$pid" 2>/dev/null || true
    sleep 1
    kill -KILL -- "-$pid" 2>/dev/null || true
  else
    say "$1 not running"
  fi
  rm -f "$pidfile"
}

stop() {
  stop_one ray
  # `ray stop` would also forget the head in /tmp/ray/ray_current_cluster; without that, a
  # later ray.init() with no address on this machine tries to join the dead head.
  local current="${RAY_TMPDIR:-/tmp/ray}/ray_current_cluster"
  if [ -f "$current" ] && grep -q ":${RAY_PORT}\$" "$current"; then rm -f "$current"; fi
  stop_one prefect
}

status() {
  local code=0
  for name in prefect ray; do
    if alive "$STACK_DIR/$name.pid"; then say "$name running (pid $(cat "$STACK_DIR/$name.pid"))"
    else say "$name stopped"; code=1; fi
  done
  return $code
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
