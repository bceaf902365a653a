#!/usr/bin/env bash
# The full test suite, as CI runs it: servers first, then format, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
