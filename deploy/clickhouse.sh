#!/usr/bin/env bash
# A ClickHouse server on loopback, for tests and local runs: Debian's clickhouse-server
# package (installed when missing), run as a plain process with its data in DIR (no systemd,
# nothing written to /etc).
#
#   deploy/clickhouse.sh start DIR HTTP_PORT   install if needed, start, wait until it answers
#   deploy/clickhouse.sh stop DIR              SIGTERM, wait for exit
#   deploy/clickhouse.sh kill DIR              SIGKILL
#
# Facts behind the flags: ../shared/reference/real-services.md (the interserver port, the
# listen host, the binary's place).
set -euo pipefail

SERVER=/usr/sbin/clickhouse-server

install() {
  [ -x "$SERVER" ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "clickhouse.sh: clickhouse-server is missing and apt-get is not here to install it" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || {
      echo "clickhouse.sh: installing clickhouse-server needs root (or sudo)" >&2
      exit 1
    }
    sudo="sudo"
  fi
  ($sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    clickhouse-server clickhouse-client) >&2
}

start() {
  local dir=$1 port=$2 tcp=$(($2 + 1))
  install
  mkdir -p "$dir"/{data,tmp,user_files,format_schemas}
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "clickhouse.sh: a server already runs in $dir (pid $(cat "$dir/pid"))" >&2
    exit 1
  fi
  nohup "$SERVER" --config-file=/etc/clickhouse-server/config.xml -- \
    --path="$dir/data/" --tmp_path="$dir/tmp/" --user_files_path="$dir/user_files/" \
    --format_schema_path="$dir/format_schemas/" --listen_host=127.0.0.1 \
    --http_port="$port" --tcp_port="$tcp" --interserver_http_port=0 \
    --logger.log="$dir/server.log" --logger.errorlog="$dir/server.err.log" \
    </dev/null >>"$dir/stdout.log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$port/?query=SELECT%201" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "clickhouse.sh: the server exited:" >&2
      tail -n 20 "$dir/stdout.log" "$dir/server.err.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "clickhouse.sh: the server did not answer within 30 s" >&2
  exit 1
}

stop() {
  local dir=$1 signal=${2:-TERM}
  [ -f "$dir/pid" ] || return 0
  local pid
  pid=$(cat "$dir/pid")
  kill -"$signal" "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$dir/pid"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case "${1:-}" in
  install) install ;;
  start) start "$2" "$3" ;;
  stop) stop "$2" TERM ;;
  kill) stop "$2" KILL ;;
  *) echo "usage: $0 install | start DIR HTTP_PORT | stop DIR | kill DIR" >&2; exit 2 ;;
esac
