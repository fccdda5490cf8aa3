#!/usr/bin/env bash
# The whole test suite, from a fresh clone: formatting, lints, then every test.
# Services the tests need are installed and started here (none yet: the embedded mode needs
# none; the Kafka, ClickHouse and browser suites will add their set-up to this script).
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
cargo test --workspace --locked
