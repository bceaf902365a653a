#!/usr/bin/env bash
# Installs the Debian tools and baseline servers some benchmarks drive
# (`fleet bench concierge`: wrk, dnsperf, NSD). Idempotent.
set -euo pipefail
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v nsd >/dev/null || [ -x /usr/sbin/nsd ] || need+=(nsd)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # The package's own service (port 53) is not needed: benchmarks start NSD themselves.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  if command -v systemctl >/dev/null && systemctl is-active --quiet nsd 2>/dev/null; then
    $sudo systemctl stop nsd || true
  fi
fi
echo "bench tools: wrk $(command -v wrk), dnsperf $(command -v dnsperf), nsd $(command -v nsd || echo /usr/sbin/nsd)"
