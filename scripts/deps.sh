#!/usr/bin/env bash
# Installs what the tests and `make run` need on Debian 12 (run as root).
# Idempotent: with everything present it only queries dpkg and exits.
# It never starts the system ejabberd service (tests run private nodes via
# test/harness) and never touches epmd.
set -euo pipefail

log() { printf 'deps: %s\n' "$*"; }
die() { printf 'deps: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

# Wanted packages. Alternatives are separated by '|': the first one apt knows
# is used (names differ between Debian releases).
WANTED=(
  ejabberd
  erlang-nox
  erlang-dev
  erlang-eunit
  rebar3
  ca-certificates
  openssl
)

is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

# apt knows a package if it has a candidate version.
apt_knows() {
  local cand
  cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')"
  [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

# resolve "a|b" -> first alternative that is installed, else first known to apt.
resolve() {
  local alt
  local -a alts
  IFS='|' read -r -a alts <<<"$1"
  for alt in "${alts[@]}"; do is_installed "$alt" && { echo "$alt"; return 0; }; done
  for alt in "${alts[@]}"; do apt_knows "$alt" && { echo "$alt"; return 0; }; done
  return 1
}

missing=()
for spec in "${WANTED[@]}"; do
  first="${spec%%|*}"
  installed=""
  IFS='|' read -r -a alts <<<"$spec"
  for alt in "${alts[@]}"; do is_installed "$alt" && installed="$alt" && break; done
  if [ -n "$installed" ]; then
    log "ok: $installed"
  else
    missing+=("$spec")
    log "missing: $first"
  fi
done

# System ejabberd node (runs as user ejabberd, started by the package's init
# script); the harness nodes run as root, so they never match this.
system_ejabberd_pids() { pgrep -u ejabberd -f 'beam' 2>/dev/null || true; }

if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get update"
  apt-get update -qq
  to_install=()
  for spec in "${missing[@]}"; do
    if pkg="$(resolve "$spec")"; then
      to_install+=("$pkg")
    else
      die "no installable package for '$spec' (apt-cache policy has no candidate)"
    fi
  done

  before="$(system_ejabberd_pids)"
  # Keep maintainer scripts from starting services (standard Debian
  # mechanism, honoured by invoke-rc.d and deb-systemd-invoke).
  created_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
    log "installed temporary /usr/sbin/policy-rc.d (no service starts)"
  fi
  cleanup_policy() { [ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d && log "removed temporary policy-rc.d"; return 0; }
  trap cleanup_policy EXIT

  log "apt-get install ${to_install[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${to_install[@]}"

  cleanup_policy
  created_policy=""
  trap - EXIT

  # If the install started ejabberd anyway, stop exactly those new PIDs.
  for pid in $(system_ejabberd_pids); do
    if grep -qx "$pid" <<<"$before"; then continue; fi
    log "stopping system ejabberd started by the install (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid still alive after 10s, SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
else
  log "all apt packages present, no apt-get update"
fi

if ! compgen -G '/usr/lib/*/ejabberd-*/ebin/ejabberd.app' >/dev/null \
   && ! compgen -G '/usr/lib/erlang/lib/ejabberd-*/ebin/ejabberd.app' >/dev/null; then
  die "ejabberd is installed but its ebin directory was not found"
fi

if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
  log "warning: Go toolchain not found (expected /usr/local/go/bin/go); not installed by this script"
fi

# JS test clients.
clients="$REPO_ROOT/test/clients"
if [ -f "$clients/package.json" ]; then
  if ! command -v npm >/dev/null; then
    log "npm missing: installing nodejs npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm
  fi
  lock=""
  [ -f "$clients/package-lock.json" ] && lock="$clients/package-lock.json"
  [ -z "$lock" ] && [ -f "$clients/npm-shrinkwrap.json" ] && lock="$clients/npm-shrinkwrap.json"
  if [ ! -d "$clients/node_modules" ] \
     || [ "$clients/package.json" -nt "$clients/node_modules" ] \
     || { [ -n "$lock" ] && [ "$lock" -nt "$clients/node_modules" ]; }; then
    if [ -n "$lock" ]; then
      log "npm ci in test/clients"
      (cd "$clients" && npm ci --no-audit --no-fund)
    else
      log "npm install in test/clients (no lock file; npm ci needs one)"
      (cd "$clients" && npm install --no-audit --no-fund)
    fi
    touch "$clients/node_modules"
  else
    log "ok: test/clients/node_modules up to date"
  fi
else
  log "no test/clients/package.json, skipping npm"
fi

log "done"
