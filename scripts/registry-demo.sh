#!/usr/bin/env bash
# A registry round trip between two regions on SQLite files: devices created
# in each region, merged both ways, changed, exported, imported, converged.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p registry-sync
rs=target/release/registry-sync
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
a="sqlite://$dir/region-a.db"
b="sqlite://$dir/region-b.db"
step() { printf '\n\033[1m$ %s\033[0m\n' "$(echo "$*" | sed "s|$dir|\$RUN|g; s|target/release/||")"; "$@"; }

step $rs device add --db "$a" --region a thermostat-1
step $rs device add --db "$a" --count 1000 --prefix sensor- --keys-out "$dir/keys.ndjson"
step $rs device add --db "$b" --region b gateway-9
step $rs diff --from "$a" --into "$b"
step $rs merge --from "$a" --into "$b"
step $rs device disable --db "$b" sensor-042
step $rs device remove --db "$b" sensor-007
step $rs export --db "$b" --out "$dir/b.ndjson"
step $rs import --db "$a" --in "$dir/b.ndjson"
step $rs --json merge --from "$a" --into "$b"
step $rs diff --from "$b" --into "$a"
head -c -1 "$dir/b.ndjson" > "$dir/cut.ndjson"
step $rs import --db "$a" --in "$dir/cut.ndjson" || true
echo
echo "both registries hold the same $( $rs export --db "$a" | tail -n 1 )"
