#!/usr/bin/env bash
# The whole test suite, from a fresh clone: formatting, lints, then every test.
# Services and tools the tests need are installed and started here (the embedded mode needs no
# service; the Kafka, ClickHouse and browser suites will add theirs). Python 3 is needed for
# the API fuzzer (schemathesis, installed from PyPI into target/py).
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

# The HTTP API, fuzzed from its OpenAPI description: no input may produce a server error.
echo "== schemathesis against schemas/openapi.yaml"
python3 -m venv target/py >/dev/null
target/py/bin/pip install --quiet --disable-pip-version-check schemathesis==4.32.5
data=$(mktemp -d)
port=18555
"${CARGO_TARGET_DIR:-target}/debug/postbackd" serve --listen 127.0.0.1:$port --data-dir "$data" \
  --api-key fuzz >"$data/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$data"' EXIT
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
target/py/bin/st run schemas/openapi.yaml --url http://127.0.0.1:$port --header "API-Key: fuzz" \
  --checks not_a_server_error --max-examples 100 --seed 1 --suppress-health-check all --no-color | tail -n 12
if grep -q panicked "$data/log"; then
  echo "postbackd panicked under the fuzzer:" >&2
  grep -A3 panicked "$data/log" >&2
  exit 1
fi

# One closing line over all the Rust tests (cargo's own last line is a doc-test summary).
echo "tests: $passed passed, $failed failed"
