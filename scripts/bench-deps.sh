#!/usr/bin/env bash
# Installs what `make bench` and `make bench-tsung` need beyond scripts/deps.sh
# (run as root, Debian 12): gnuplot for the report's PNG plots and Tsung 1.7
# for the outside load generator. Idempotent: with both present it only
# queries dpkg. Never starts a service.
set -euo pipefail

log() { printf 'bench-deps: %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { log "run as root"; exit 1; }

missing=()
for pkg in gnuplot-nox tsung; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" = "installed" ]; then
    log "ok: $pkg"
  else
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
