#!/usr/bin/env bash
# The whole test suite, from a fresh clone: formatting, lints, then every test.
# Services and tools the tests need are installed and started here: a Kafka broker (KRaft, from
# Maven Central with the machine's Java and Maven: deploy/kafka.sh) for the Kafka suites, a
# ClickHouse server (Debian's package, as a plain process: deploy/clickhouse.sh) for the
# ClickHouse suites, a current ClickHouse engine in process (chdb, from PyPI into target/py)
# for the modern DDL and queries, the API fuzzer (schemathesis, from PyPI into target/py), and
# Chromium (Debian's) with Playwright (PyPI) for the console.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
results=$(mktemp)
cargo test --workspace --locked 2>&1 | tee "$results"
passed=$(awk '/^test result:/ {p += $4} END {print p + 0}' "$results")
failed=$(awk '/^test result:/ {f += $6} END {print f + 0}' "$results")
rm -f "$results"

# The Kafka event log, against a real broker: the log conformance suite, the HTTP suites with
# the engine's logs on Kafka, and the broker stopped for 20 s under load. The broker stays up
# for the cluster suites below.
echo "== Kafka suites"
kafka_dir=$(mktemp -d)
kafka_port=19192
clickhouse_dir=$(mktemp -d)
cleanup() {
  bash deploy/kafka.sh stop "$kafka_dir" || true
  rm -rf "$kafka_dir"
  bash deploy/clickhouse.sh stop "$clickhouse_dir" || true
  rm -rf "$clickhouse_dir"
  if [ -n "${fuzz_pid:-}" ]; then kill "$fuzz_pid" 2>/dev/null || true; fi
  if [ -n "${fuzz_data:-}" ]; then rm -rf "$fuzz_data"; fi
  if [ -n "${cluster_dir:-}" ] && [ -d "$cluster_dir" ]; then
    bash deploy/cluster.sh stop "$cluster_dir" >/dev/null 2>&1 || true
    rm -rf "$cluster_dir"
  fi
}
trap cleanup EXIT
bash deploy/kafka.sh start "$kafka_dir" "$kafka_port"
kafka_results=$(mktemp)
POSTBACKD_TEST_KAFKA=127.0.0.1:$kafka_port POSTBACKD_TEST_KAFKA_DIR=$kafka_dir \
  cargo test --locked -p postback-kafka -p postbackd --test conformance --test e2e --test paging \
  --test delivery --test kafka_outage --test roles -- --include-ignored 2>&1 | tee "$kafka_results"
passed=$((passed + $(awk '/^test result:/ {p += $4} END {print p + 0}' "$kafka_results")))
failed=$((failed + $(awk '/^test result:/ {f += $6} END {print f + 0}' "$kafka_results")))
rm -f "$kafka_results"

# The ClickHouse analytics store, against Debian's server (18.16): the analytics conformance
# suite, the HTTP suites with the engine's analytics on ClickHouse, and the server stopped for
# 20 s under load; then the DDL and every query template in a current engine (chdb).
echo "== ClickHouse suites"
clickhouse_port=18123
bash deploy/clickhouse.sh start "$clickhouse_dir" "$clickhouse_port"
python3 -m venv target/py >/dev/null
target/py/bin/pip install --quiet --disable-pip-version-check chdb==4.4.0
clickhouse_results=$(mktemp)
export POSTBACKD_TEST_CLICKHOUSE=clickhouse://127.0.0.1:$clickhouse_port
export POSTBACKD_TEST_CLICKHOUSE_DIR=$clickhouse_dir POSTBACKD_TEST_CHDB_PYTHON=$PWD/target/py/bin/python
cargo test --locked -p postback-clickhouse -- --include-ignored 2>&1 | tee "$clickhouse_results"
cargo test --locked -p postbackd --test e2e --test paging --test delivery --test clickhouse_outage \
  -- --include-ignored 2>&1 | tee -a "$clickhouse_results"
# Several engines on the one Kafka and the one ClickHouse: a shared catalog, shared deliveries.
echo "== Cluster suites"
POSTBACKD_TEST_KAFKA=127.0.0.1:$kafka_port cargo test --locked -p postbackd --test cluster \
  -- --include-ignored 2>&1 | tee -a "$clickhouse_results"
unset POSTBACKD_TEST_CLICKHOUSE POSTBACKD_TEST_CLICKHOUSE_DIR POSTBACKD_TEST_CHDB_PYTHON
passed=$((passed + $(awk '/^test result:/ {p += $4} END {print p + 0}' "$clickhouse_results")))
failed=$((failed + $(awk '/^test result:/ {f += $6} END {print f + 0}' "$clickhouse_results")))
rm -f "$clickhouse_results"
bash deploy/clickhouse.sh stop "$clickhouse_dir"
bash deploy/kafka.sh stop "$kafka_dir"

# The HTTP API, fuzzed from its OpenAPI description: no input may produce a server error.
echo "== schemathesis against schemas/openapi.yaml"
target/py/bin/pip install --quiet --disable-pip-version-check schemathesis==4.32.5
fuzz_data=$(mktemp -d)
data=$fuzz_data
port=18555
"${CARGO_TARGET_DIR:-target}/debug/postbackd" serve --listen 127.0.0.1:$port --data-dir "$data" \
  --api-key fuzz >"$data/log" 2>&1 &
fuzz_pid=$!
ready=0
for _ in $(seq 1 100); do
  if curl -sf http://127.0.0.1:$port/ready >/dev/null; then ready=1; break; fi
  sleep 0.1
done
if [ "$ready" != 1 ]; then
  echo "postbackd did not start for the fuzzer:" >&2
  cat "$data/log" >&2
  exit 1
fi
# (The live stream never ends by design: its filters are the listing's, fuzzed there.)
target/py/bin/st run schemas/openapi.yaml --url http://127.0.0.1:$port --header "API-Key: fuzz" \
  --exclude-path /3.0/stats/serverpostbacks/live \
  --checks not_a_server_error --max-examples 100 --seed 1 --suppress-health-check all --no-color | tail -n 12
if grep -q panicked "$data/log"; then
  echo "postbackd panicked under the fuzzer:" >&2
  grep -A3 panicked "$data/log" >&2
  exit 1
fi

# The web console in a real browser: Debian's Chromium (installed here when missing), driven
# by Playwright from PyPI (no browser download), against an engine of its own.
echo "== console in Chromium"
if [ ! -x /usr/bin/chromium ]; then
  sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
  ($sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
target/py/bin/pip install --quiet --disable-pip-version-check playwright==1.65.2
console_data=$(mktemp -d)
"${CARGO_TARGET_DIR:-target}/debug/postbackd" serve --listen 127.0.0.1:18556 --data-dir "$console_data" \
  --api-key console --allow-private-postback-targets >"$console_data/log" 2>&1 &
console_pid=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18556/ready >/dev/null && break; sleep 0.1; done
target/py/bin/python engine/postbackd/tests/browser/console_test.py http://127.0.0.1:18556 console \
  "${CARGO_TARGET_DIR:-target}/console-screenshots"
kill "$console_pid"
rm -rf "$console_data"

# The deployment files: every engine they define gets a configuration postbackd accepts, and
# probes its real endpoints (no container engine or Kubernetes cluster runs here).
echo "== deployment files"
target/py/bin/pip install --quiet --disable-pip-version-check pyyaml==6.0.2
target/py/bin/python deploy/check_deploy.py "${CARGO_TARGET_DIR:-target}/debug/postbackd"

# A cluster of separate processes from deploy/cluster.sh: three engines on their own Kafka and
# ClickHouse, the third killed (SIGKILL) under load, a fourth started. pbload spreads clicks,
# postbacks, duplicates (on the same click and on other clicks, so on other processes'
# partitions), status updates and pixels over the engines, receives the affiliate postbacks
# itself, and checks that every acknowledged postback is in the stats once with its outcome and
# that every conversion state reached the affiliate once (exit code 1 if not). The killed engine
# processes and dedupes but does not dispatch: a dispatcher killed between an affiliate's 200
# and the record of it sends that state again (at least once; see README, "Guarantees").
echo "== cluster of processes (deploy/cluster.sh)"
cargo build --locked -q -p pbload
cluster_dir=$(mktemp -d)
export BIN="${CARGO_TARGET_DIR:-target}/debug/postbackd" KAFKA_PORT=19692 CLICKHOUSE_PORT=18723 BASE_PORT=18700
pbload_bin="${CARGO_TARGET_DIR:-target}/debug/pbload"
cluster_targets() { bash deploy/cluster.sh urls "$cluster_dir" | sed 's/^/--target /'; }
# A failed check leaves the engines' own account of it: each one's hand-overs of partitions
# (where it started each, and where another process had been), then the end of its log.
cluster_load() {
  # shellcheck disable=SC2046
  if ! "$pbload_bin" $(cluster_targets) --api-key cluster --rate 200 --verify \
    --receive-postbacks --quiet "$@"; then
    for log in "$cluster_dir"/engine-*/out.log; do
      echo "-- $log"
      grep -E "a partition|another process|moved to another|commit failed|WARN|ERROR" "$log" | tail -n 80
      echo "-- (its end)"; tail -n 20 "$log"
    done
    bash deploy/cluster.sh stop "$cluster_dir"
    exit 1
  fi
}
bash deploy/cluster.sh start "$cluster_dir" all all ingest,process,api
(sleep 2; bash deploy/cluster.sh kill "$cluster_dir" 3) &
killer=$!
cluster_load --duration 6
wait "$killer"
bash deploy/cluster.sh add "$cluster_dir" all
cluster_load --duration 4
bash deploy/cluster.sh stop "$cluster_dir"
rm -rf "$cluster_dir"
unset BIN KAFKA_PORT CLICKHOUSE_PORT BASE_PORT

# One closing line over all the Rust tests (cargo's own last line is a doc-test summary).
echo "tests: $passed passed, $failed failed"
