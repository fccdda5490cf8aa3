#!/usr/bin/env bash
# A whole cluster on one machine, on loopback: one Kafka broker (deploy/kafka.sh), one
# ClickHouse server (deploy/clickhouse.sh) and postbackd engines, each with its roles, its own
# data directory and its own port. For the tests, the benchmarks and a look by hand.
#
#   deploy/cluster.sh start DIR ROLES...   the services, then one engine per ROLES argument
#                                          (e.g. all, or ingest,api); engine i listens on
#                                          127.0.0.1:$((BASE_PORT + i)), i from 1
#   deploy/cluster.sh add DIR ROLES        one more engine (the next number)
#   deploy/cluster.sh kill DIR I           SIGKILL engine I (a process that dies at once)
#   deploy/cluster.sh stop DIR             every engine (SIGTERM), then the services
#   deploy/cluster.sh urls DIR             the running engines' base URLs, one a line
#
# Environment: BIN (postbackd, default target/release/postbackd), BASE_PORT (18300),
# KAFKA_PORT (19492), CLICKHOUSE_PORT (18423), API_KEY (cluster). Every engine gets
# --log kafka://127.0.0.1:$KAFKA_PORT/cluster and --store clickhouse://127.0.0.1:$CLICKHOUSE_PORT/cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/postbackd}
BASE_PORT=${BASE_PORT:-18300}
KAFKA_PORT=${KAFKA_PORT:-19492}
CLICKHOUSE_PORT=${CLICKHOUSE_PORT:-18423}
API_KEY=${API_KEY:-cluster}

# Waits until the engine on PORT (process PID) answers /ready, so that an engine that fails
# to start is reported with its log (engines may migrate one database at once; this also
# keeps their starts apart).
wait_ready() { # PORT PID LOG
  for _ in $(seq 1 600); do
    curl -sf --max-time 1 "http://127.0.0.1:$1/ready" >/dev/null 2>&1 && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      echo "cluster.sh: the engine on port $1 exited:" >&2
      tail -n 20 "$3" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "cluster.sh: the engine on port $1 did not become ready" >&2
  return 1
}

engine() { # engine DIR I ROLES
  local dir=$1 i=$2 roles=$3 port=$((BASE_PORT + $2))
  [ -x "$BIN" ] || { echo "cluster.sh: no postbackd at $BIN (cargo build --release -p postbackd)" >&2; exit 1; }
  mkdir -p "$dir/engine-$i"
  "$BIN" serve --listen "127.0.0.1:$port" --data-dir "$dir/engine-$i" --api-key "$API_KEY" \
    --allow-private-postback-targets --roles "$roles" --migrate \
    --log "kafka://127.0.0.1:$KAFKA_PORT/cluster" \
    --store "clickhouse://127.0.0.1:$CLICKHOUSE_PORT/cluster" \
    >"$dir/engine-$i/out.log" 2>&1 &
  echo $! >"$dir/engine-$i/pid"
  echo "$port" >"$dir/engine-$i/port"
  wait_ready "$port" "$(cat "$dir/engine-$i/pid")" "$dir/engine-$i/out.log"
  echo "engine $i ($roles): http://127.0.0.1:$port" >&2
}

engines() { # the numbers of the engines started in DIR, in order
  local dir=$1
  for d in "$dir"/engine-*; do [ -d "$d" ] && echo "${d##*-}"; done | sort -n
}

case "${1:-}" in
  start)
    dir=$2; shift 2
    [ $# -gt 0 ] || set -- all
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    bash deploy/kafka.sh start "$dir/kafka" "$KAFKA_PORT" >&2
    bash deploy/clickhouse.sh start "$dir/clickhouse" "$CLICKHOUSE_PORT" >&2
    i=0
    for roles in "$@"; do
      i=$((i + 1))
      engine "$dir" "$i" "$roles"
    done
    ;;
  add)
    dir=$(cd "$2" && pwd)
    last=$(engines "$dir" | tail -1)
    engine "$dir" $((${last:-0} + 1)) "${3:-all}"
    ;;
  kill)
    pid=$(cat "$2/engine-$3/pid")
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    ;;
  stop)
    dir=$2
    for i in $(engines "$dir"); do
      pid=$(cat "$dir/engine-$i/pid" 2>/dev/null || true)
      [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for i in $(engines "$dir"); do
      pid=$(cat "$dir/engine-$i/pid" 2>/dev/null || true)
      while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
    bash deploy/clickhouse.sh stop "$dir/clickhouse" >&2 || true
    bash deploy/kafka.sh stop "$dir/kafka" >&2 || true
    ;;
  urls)
    for i in $(engines "$2"); do
      pid=$(cat "$2/engine-$i/pid")
      kill -0 "$pid" 2>/dev/null && echo "http://127.0.0.1:$(cat "$2/engine-$i/port")"
    done
    ;;
  *)
    sed -n '2,17p' "$0" >&2
    exit 2
    ;;
esac
