#!/usr/bin/env bash
# The benchmark: one command, on this machine. Builds in release; runs a bare hyper server,
# nginx (answering 204 with its access log on) and postbackd (embedded, durable) under the
# same open-loop load from pbload, ramping each to its peak; then the click redirect rate, the
# end-to-end lag at half the engine's peak (with --verify), and the stats query latencies over
# a large log. Prints a table with the ratios. Loopback only.
#
#   bash benches/run.sh                 # the full run (about 20 minutes)
#   QUICK=1 bash benches/run.sh         # shorter steps and a smaller log, for a first look
#   ONLY="bare kafka" bash benches/run.sh   # some sections only (bare nginx engine e2e kafka
#                                           # sustained cluster closed stats stats-clickhouse)
#
# The kafka section starts a single-node broker (deploy/kafka.sh) and measures postbackd with
# its logs on Kafka (acks=all): the ingest peak, and the end-to-end lag at half of it
# (KAFKA_PARTITIONS=N for topics of N partitions instead of the default 12).
# The cluster section starts deploy/cluster.sh (Kafka, ClickHouse) with 1, 2 and 3 engines on
# this one machine (every engine with every role: each ingests, processes, dedupes and
# dispatches its share of the partitions), ramps postback ingest spread over them (acks=all),
# and measures the end-to-end lag at half the 3-engine peak, verified.
# The stats sections fill a store with ROWS logged postbacks over 30 days (kept in target/ for
# the next run) and time the insert rate and every query kind: `stats` the embedded SQLite
# store, `stats-clickhouse` a ClickHouse server started on loopback (deploy/clickhouse.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

STEP_SECS=${STEP_SECS:-5}
RAMP=${RAMP:-4000:200000:4000}
ROWS=${ROWS:-10000000}
if [ "${QUICK:-}" = 1 ]; then STEP_SECS=3; RAMP=4000:200000:8000; ROWS=1000000; fi

cargo build --release -p postbackd -p pbload -p postback-benches --bins
BIN=target/release
if ! command -v nginx >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

ONLY=${ONLY:-bare nginx engine e2e sustained kafka cluster closed stats stats-clickhouse}
want() { [[ " $ONLY " == *" $1 "* ]]; }
# The broker of the kafka and cluster sections runs as a production broker would (full JIT,
# G1, 1 GiB heap), not with the tests' quick-start flags (C1 only): at 8,000 req/s of the full
# mix those made it spend 80-88 µs of CPU per request against 58-60, on the cores it shares
# with the engine and the generator.
export KAFKA_JVM_OPTS=${KAFKA_JVM_OPTS:--XX:+UseG1GC -Xms1g -Xmx1g}
# The topics' partitions in the kafka section: the engine's default unless KAFKA_PARTITIONS.
kafka_partitions=${KAFKA_PARTITIONS:-12}

work=$(mktemp -d)
clickhouse_dir=target/stats-clickhouse-$ROWS
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
  [ -d "$work/kafka" ] && bash deploy/kafka.sh stop "$work/kafka" >/dev/null 2>&1
  [ -f "$clickhouse_dir/pid" ] && bash deploy/clickhouse.sh stop "$clickhouse_dir" >/dev/null 2>&1
  [ -d "$work/cluster" ] && BIN=$BIN/postbackd bash deploy/cluster.sh stop "$work/cluster" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; return 1; }
peak_mem_mib() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
ramp() { # ramp NAME URL SCENARIO [API_KEY] [SERVER_PIDS] -> prints the peak ok/s
  "$BIN/pbload" --target "$2" --api-key "${4:-}" --scenario "$3" --ramp "$RAMP" --duration "$STEP_SECS" \
    ${5:+--server-pid "$5"} --quiet --json "$work/$1.json" | tee "$work/$1.txt" >&2
  awk '/^peak/ {print $2}' "$work/$1.txt"
}
bound_at_peak() { # " (generator-bound)" if, at the last step that held its rate, pbload spent as much CPU per request as the server
  python3 -c "
import json
r=[x for x in json.load(open('$work/$1.json')) if x['achieved_rps']>=0.95*x['rate'] and x['errors']+x['overloaded']<=x['sent']/100]
print(' (generator-bound)' if r and r[-1]['cpu']['generator_bound'] else '')"
}
p99_at_peak() { # the p99 (ms) of the last step that held its rate
  python3 -c "
import json,sys
r=[x for x in json.load(open('$work/$1.json')) if x['achieved_rps']>=0.95*x['rate'] and x['errors']+x['overloaded']<=x['sent']/100]
print('%.1f' % r[-1]['latency']['p99'] if r else '?')"
}

bare= bare_p99= bare_bound= nginx_bound= pbd_bound= clicks_bound= bare_mem= nginx= nginx_p99= nginx_mem= pbd= pbd_p99= pbd_mem= clicks= clicks_p99=
e2e= half= kafka= kafka_p99= kafka_mem= kafka_e2e= kafka_half=
if want bare; then
echo "== bare hyper" >&2
"$BIN/bare_hyper" 127.0.0.1:18081 >/dev/null & pids+=($!); bare_pid=$!
wait_port 18081
bare=$(ramp bare http://127.0.0.1:18081 postback "" $bare_pid); bare_p99=$(p99_at_peak bare); bare_bound=$(bound_at_peak bare)
bare_mem=$(peak_mem_mib $bare_pid)
kill $bare_pid
fi

nginx_conf() { # DIR PORT: nginx answering 204 with its access log on, its files in DIR
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<CONF
worker_processes auto;
pid $1/nginx.pid;
error_log $1/error.log;
events { worker_connections 8192; }
http {
  access_log $1/access.log;
  client_body_temp_path $1; proxy_temp_path $1; fastcgi_temp_path $1;
  uwsgi_temp_path $1; scgi_temp_path $1;
  server { listen 127.0.0.1:$2; location / { return 204; } }
}
CONF
}

if want nginx; then
echo "== nginx (return 204, access log on)" >&2
nginx_conf "$work/nginx" 18082
"$NGINX" -c "$work/nginx/nginx.conf" -g 'daemon off;' & pids+=($!); nginx_pid=$!
wait_port 18082
nginx_pids=$(ps -o pid= --ppid $nginx_pid | tr -d " " | paste -sd, -)
nginx=$(ramp nginx http://127.0.0.1:18082 postback "" "$nginx_pids"); nginx_p99=$(p99_at_peak nginx); nginx_bound=$(bound_at_peak nginx)
nginx_mem=$(ps -o rss= --ppid $nginx_pid | awk '{s+=$1} END {printf "%.0f", s/1024}')
kill $nginx_pid
fi

if want engine; then
echo "== postbackd (embedded, fsync'd group commit)" >&2
"$BIN/postbackd" serve --listen 127.0.0.1:18083 --data-dir "$work/engine" --api-key bench >/dev/null 2>&1 & pids+=($!); pbd_pid=$!
wait_port 18083
pbd=$(ramp pbd http://127.0.0.1:18083 postback bench $pbd_pid); pbd_p99=$(p99_at_peak pbd); pbd_bound=$(bound_at_peak pbd)
pbd_mem=$(peak_mem_mib $pbd_pid)
echo "== click redirects" >&2
clicks=$(ramp clicks http://127.0.0.1:18083 click bench $pbd_pid); clicks_p99=$(p99_at_peak clicks); clicks_bound=$(bound_at_peak clicks)
kill $pbd_pid; wait $pbd_pid 2>/dev/null || true
fi

# The end-to-end lag at half a peak, with the full mix and --verify: NAME PORT RATE [ARGS...]
e2e_at() {
  local name=$1 port=$2 rate=$3; shift 3
  "$BIN/postbackd" serve --listen 127.0.0.1:$port --data-dir "$work/$name" --api-key bench "$@" >/dev/null 2>&1 & pids+=($!)
  local pid=$!
  wait_port $port
  "$BIN/pbload" --target http://127.0.0.1:$port --api-key bench --scenario full --rate "$rate" --duration 20 \
    --verify --quiet --json "$work/$name.json" | tee "$work/$name.txt" >&2 || true
  kill $pid
  python3 -c "
import json; r=json.load(open('$work/$name.json'))[0]; l=r.get('e2e_lag') or {}; v=r.get('verify') or {}
ok = v.get('expected',0)>0 and v.get('missing',1)==0 and v.get('duplicated',1)==0 and v.get('wrong_outcome',1)==0
print('p50 %.0f ms, p99 %.0f ms (n=%d); verify %s' % (l.get('p50',0), l.get('p99',0), l.get('count',0), 'passed' if ok else 'FAILED'))"
}

if want e2e; then
echo "== end to end at half the peak, full mix, verified" >&2
half=$(python3 -c "print(max(100, int(float('${pbd:-0}')/2)))")
e2e=$(e2e_at engine2 18084 "$half")
fi

if want kafka; then
echo "== postbackd on Kafka (acks=all)" >&2
bash deploy/kafka.sh start "$work/kafka" 19292 >&2
POSTBACKD_PARTITIONS=$kafka_partitions "$BIN/postbackd" serve --listen 127.0.0.1:18085 --data-dir "$work/engine-kafka" --api-key bench \
  --log kafka://127.0.0.1:19292/bench >/dev/null 2>&1 & pids+=($!); kafka_pid=$!
wait_port 18085
kafka=$(ramp kafka http://127.0.0.1:18085 postback bench); kafka_p99=$(p99_at_peak kafka); kafka_mem=$(peak_mem_mib $kafka_pid)
kill $kafka_pid; wait $kafka_pid 2>/dev/null || true
echo "== end to end on Kafka at half its peak, full mix, verified" >&2
kafka_half=$(python3 -c "print(max(100, int(float('${kafka:-0}')/2)))")
kafka_e2e=$(POSTBACKD_PARTITIONS=$kafka_partitions e2e_at e2e-kafka 18086 "$kafka_half" --log kafka://127.0.0.1:19292/bench-e2e)
bash deploy/kafka.sh stop "$work/kafka" >&2
fi

cluster_peaks=() cluster_p99=() cluster_e2e= cluster_half=
if want cluster; then
for n in 1 2 3; do
  echo "== cluster of $n engine(s) on Kafka and ClickHouse" >&2
  roles=(); for _ in $(seq 1 "$n"); do roles+=(all); done
  BIN=$BIN/postbackd API_KEY=bench bash deploy/cluster.sh start "$work/cluster" "${roles[@]}" >&2
  targets=$(BIN=$BIN/postbackd bash deploy/cluster.sh urls "$work/cluster" | paste -sd, -)
  cluster_peaks+=("$(ramp "cluster$n" "$targets" postback bench)")
  cluster_p99+=("$(p99_at_peak "cluster$n")")
  if [ "$n" = 3 ]; then
    echo "== end to end on the 3-engine cluster at half its peak, full mix, verified" >&2
    cluster_half=$(python3 -c "print(max(100, int(float('${cluster_peaks[2]:-0}')/2)))")
    "$BIN/pbload" --target "$targets" --api-key bench --scenario full --rate "$cluster_half" --duration 20 \
      --verify --quiet --json "$work/cluster-e2e.json" | tee "$work/cluster-e2e.txt" >&2 || true
    cluster_e2e=$(python3 -c "
import json; r=json.load(open('$work/cluster-e2e.json'))[0]; l=r.get('e2e_lag') or {}; v=r.get('verify') or {}
ok = v.get('expected',0)>0 and v.get('missing',1)==0 and v.get('duplicated',1)==0 and v.get('wrong_outcome',1)==0
print('p50 %.0f ms, p99 %.0f ms (n=%d); verify %s' % (l.get('p50',0), l.get('p99',0), l.get('count',0), 'passed' if ok else 'FAILED'))")
  fi
  BIN=$BIN/postbackd bash deploy/cluster.sh stop "$work/cluster" >&2
  rm -rf "$work/cluster"
done
fi

# Sustained: the full mix for 60 s (SUSTAIN_SECS) at the highest rate where processing keeps
# up (end-to-end lag p99 under 1 s), from half the postback peak (or SUSTAIN_RATE) down by a
# fifth until it holds, at most four tries; verified.
sustained=
if want sustained; then
echo "== sustained full pipeline" >&2
rate=${SUSTAIN_RATE:-$(python3 -c "print(max(500, int(float('${pbd:-4000}')/2)))")}
for try in 1 2 3 4; do
  "$BIN/postbackd" serve --listen 127.0.0.1:18095 --data-dir "$work/sustained-$try" --api-key bench >/dev/null 2>&1 & pids+=($!); sus_pid=$!
  wait_port 18095
  "$BIN/pbload" --target http://127.0.0.1:18095 --api-key bench --scenario full --rate "$rate" \
    --duration "${SUSTAIN_SECS:-60}" --verify --quiet --server-pid $sus_pid --json "$work/sustained.json" >&2 || true
  kill $sus_pid; wait $sus_pid 2>/dev/null || true
  line=$(python3 -c "
import json; r=json.load(open('$work/sustained.json'))[0]; l=r.get('e2e_lag') or {}; v=r.get('verify') or {}
ok = v.get('expected',0)>0 and v.get('missing',1)==0 and v.get('duplicated',1)==0 and v.get('wrong_outcome',1)==0
held = r['achieved_rps'] >= 0.95*r['rate'] and l.get('p99', 1e9) < 1000
stages = ', '.join('%s %.1f' % kv for kv in sorted(r['cpu'].get('server_by_thread', {}).items(), key=lambda kv: -kv[1]))
print('%s|%.0f ok/s for %.0f s, e2e lag p50 %.0f ms, p99 %.0f ms (n=%d), server CPU %.1f µs per request (by thread: %s); verify %s' % ('held' if held else 'short', r['achieved_rps'], r['duration_s'], l.get('p50',0), l.get('p99',0), l.get('count',0), r['cpu'].get('server_us_per_request') or 0, stages, 'passed' if ok else 'FAILED'))")
  echo "  $rate req/s: ${line#*|}" >&2
  if [ "${line%%|*}" = held ]; then sustained="$rate req/s: ${line#*|}"; break; fi
  rate=$(python3 -c "print(int($rate * 0.8))")
done
fi

# Closed loop, as most HTTP benchmarks run: 16, 64 and 256 keep-alive connections, each
# sending one fixed postback URL again as soon as it is answered, to bare hyper, nginx and the
# engine in turn; CPU per request of each side beside the rate. Then 64 connections that each
# write 16 requests at once (HTTP/1.1 pipelining): pbload's system calls are shared by 16, so
# the baselines are measured rather than the generator.
closed_rows=()
if want closed; then
echo "== closed loop: 16, 64, 256 connections, and 64 pipelined by 16, one postback URL" >&2
"$BIN/bare_hyper" 127.0.0.1:18091 >/dev/null & pids+=($!); cb_pid=$!
"$BIN/postbackd" serve --listen 127.0.0.1:18093 --data-dir "$work/engine-closed" --api-key bench >/dev/null 2>&1 & pids+=($!); cp_pid=$!
nginx_conf "$work/nginx-closed" 18092
"$NGINX" -c "$work/nginx-closed/nginx.conf" -g 'daemon off;' & pids+=($!); cn_pid=$!
wait_port 18091; wait_port 18092; wait_port 18093
closed_run() { # NAME PORT PIDS CONNECTIONS[xPIPELINE] -> "ok/s|p99 ms|cpu pbload|cpu server|bound"
  local c=${4%x*} p=1
  [ "$c" = "$4" ] || p=${4#*x}
  "$BIN/pbload" --target "http://127.0.0.1:$2" --scenario postback --connections "$c" --pipeline "$p" \
    --duration "$STEP_SECS" --server-pid "$3" --json "$work/closed-$1-$4.json" >&2
  python3 -c "
import json; r=json.load(open('$work/closed-$1-$4.json')); c=r['cpu']
print('%.0f|%.1f|%.1f|%.1f|%s' % (r['ok_per_s'], r['latency']['p99'], c['generator_us_per_request'], c['server_us_per_request'] or 0, ' (generator-bound)' if c['generator_bound'] else ''))"
}
for c in 16 64 256 64x16; do
  b=$(closed_run bare 18091 "$cb_pid" "$c")
  n=$(closed_run nginx 18092 "$(ps -o pid= --ppid "$cn_pid" | tr -d " " | paste -sd, -)" "$c")
  e=$(closed_run engine 18093 "$cp_pid" "$c")
  closed_rows+=("$c|$b|$n|$e")
done
kill $cb_pid $cp_pid $cn_pid 2>/dev/null || true
fi

if want stats; then
echo "== stats queries over $ROWS logged postbacks" >&2
"$BIN/stats_query" "target/stats-bench-$ROWS" "$ROWS" | tee "$work/stats.txt" >&2
fi

if want stats-clickhouse; then
echo "== stats queries over $ROWS logged postbacks, ClickHouse" >&2
bash deploy/clickhouse.sh start "$clickhouse_dir" 18123 >&2
"$BIN/stats_query" clickhouse://127.0.0.1:18123/stats_bench "$ROWS" | tee "$work/stats-clickhouse.txt" >&2
bash deploy/clickhouse.sh stop "$clickhouse_dir" >&2
fi

ratio() { python3 -c "a,b=float('$1' or 0),float('$2' or 0); print('%.2fx' % (a/b) if b else '?')"; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo
echo "Machine: $(nproc) cores ($cpu), $(free -g | awk '/Mem:/ {print $2}') GiB; load generator on the same machine; $(date -u +%F)"
echo
echo "| what | peak ok/s | p99 at peak | peak memory | ratio |"
echo "|---|---|---|---|---|"
echo "| bare hyper, 200 without work | $bare | $bare_p99 ms$bare_bound | $bare_mem MiB | 1.00x |"
echo "| nginx, 204 with access log | $nginx | $nginx_p99 ms$nginx_bound | $nginx_mem MiB | $(ratio "$nginx" "$bare") of bare hyper |"
echo "| postbackd postback ingest, embedded, durable | $pbd | $pbd_p99 ms$pbd_bound | $pbd_mem MiB | $(ratio "$pbd" "$bare") of bare hyper, $(ratio "$pbd" "$nginx") of nginx |"
echo "| postbackd click redirects | $clicks | $clicks_p99 ms$clicks_bound | | $(ratio "$clicks" "$bare") of bare hyper |"
echo "| postbackd postback ingest, Kafka acks=all, $kafka_partitions partitions | $kafka | $kafka_p99 ms | $kafka_mem MiB | $(ratio "$kafka" "$bare") of bare hyper |"
for i in 0 1 2; do
  [ -n "${cluster_peaks[$i]:-}" ] || continue
  echo "| postbackd cluster, $((i + 1)) engine(s), Kafka acks=all + ClickHouse | ${cluster_peaks[$i]} | ${cluster_p99[$i]} ms | | $(ratio "${cluster_peaks[$i]}" "$bare") of bare hyper |"
done
if [ ${#closed_rows[@]} -gt 0 ]; then
  echo
  echo "| closed loop, one postback URL | bare hyper ok/s (p99) | nginx ok/s (p99) | postbackd ok/s (p99) | postbackd / bare hyper | CPU µs per request: pbload, bare / nginx / postbackd |"
  echo "|---|---|---|---|---|---|"
  for row in "${closed_rows[@]}"; do
    IFS='|' read -r c b_ok b_p99 b_gen b_srv b_bound n_ok n_p99 n_gen n_srv n_bound e_ok e_p99 e_gen e_srv e_bound <<<"$row"
    label="$c connections"
    [ "${c%x*}" = "$c" ] || label="${c%x*} connections, pipelined by ${c#*x}"
    echo "| $label | $b_ok ($b_p99 ms)$b_bound | ${n_ok:-} (${n_p99:-} ms)${n_bound:-} | $e_ok ($e_p99 ms)$e_bound | $(ratio "$e_ok" "$b_ok") | $b_gen / ${n_gen:-} / $e_gen; $b_srv / ${n_srv:-} / $e_srv |"
  done
  echo
  echo "postbackd's CPU µs per request in the closed loop, by thread (its stages):"
  for row in "${closed_rows[@]}"; do
    c=${row%%|*}
    python3 -c "
import json; r=json.load(open('$work/closed-engine-$c.json')); t=r['cpu'].get('server_by_thread', {})
print('  $c: ' + ', '.join('%s %.1f' % kv for kv in sorted(t.items(), key=lambda kv: -kv[1])))"
  done
fi
echo
echo "End to end (accepted → visible in the stats) at $half req/s, full mix, embedded: $e2e"
echo "Sustained full pipeline, 60 s, the highest rate tried where the lag p99 stayed under 1 s: ${sustained:-not held at any rate tried}"
echo "End to end at $cluster_half req/s, full mix, on the 3-engine cluster: $cluster_e2e"
echo "End to end at $kafka_half req/s, full mix, on Kafka ($kafka_partitions partitions): $kafka_e2e"
echo
if [ -f "$work/stats.txt" ]; then
  echo "Stats queries (first page of 100), embedded store:"
  sed 's/^/    /' "$work/stats.txt"
fi
if [ -f "$work/stats-clickhouse.txt" ]; then
  echo "Stats queries (first page of 100), ClickHouse:"
  sed 's/^/    /' "$work/stats-clickhouse.txt"
fi
