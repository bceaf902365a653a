#!/usr/bin/env bash
# The full test suite, as CI runs it: servers first, then format, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build gains nothing from incremental state, which doubles the
# target directory; CI sets CI=true.
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0
fi
scripts/services.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The device agent stays lean: no broker, web server, SQL or DNS server inside.
if cargo tree --locked -p device-agent -e normal | grep -E '^.*(rumqttd|axum|sqlx|hickory-server) v'; then
  echo "device-agent depends on a server crate (above)" >&2
  exit 1
fi
# Consumers read hubs over HTTP: a consumer deployment compiles no hub, broker or web framework.
if cargo tree --locked -p consumer -e normal | grep -E '^.*[ ](hub|rumqttd|axum|hickory-server|registry-sync) v'; then
  echo "consumer depends on the hub or a server crate (above)" >&2
  exit 1
fi
cargo test --workspace --locked
