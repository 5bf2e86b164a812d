#!/usr/bin/env bash
# Builds (once) and mounts the Debian 13 (trixie) chroot that holds the
# second test target: ejabberd 24.12 on OTP 27. Run as root on Debian 12.
#
#   scripts/trixie-chroot.sh          build if needed, mount, print timings
#   scripts/trixie-chroot.sh --remove unmount and delete the chroot
#
# The chroot lives OUTSIDE the repository, in $MEGAPHONE_TRIXIE_ROOT
# (default /var/cache/megaphone/trixie), so clones and `make clean` share it.
# A stamp file inside it marks a finished build; with the stamp present the
# script only checks the bind mounts and exits (well under a second).
#
# The chroot shares the host's network, so its nodes talk to the host's epmd
# and to the sidecar over loopback. Its package services never start (a
# policy-rc.d inside the chroot), and the test harness runs erl directly.
# Mirrors are debootstrap's and apt's defaults: none is named here.
set -euo pipefail

ROOT="${MEGAPHONE_TRIXIE_ROOT:-/var/cache/megaphone/trixie}"
SUITE=trixie
# What goes into the chroot. erlc is in erlang-base (pulled in by
# erlang-nox); erlang-dev brings the headers. Change RECIPE when this list
# or the setup below changes: a stamp from another recipe means rebuild.
PACKAGES=(ejabberd erlang-nox erlang-dev)
RECIPE="1 ${PACKAGES[*]}"
STAMP="$ROOT/.megaphone-trixie-ready"

log() { printf 'trixie-chroot: %s\n' "$*"; }
die() { printf 'trixie-chroot: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and mount need it)"
case "$ROOT" in
  /*) ;;
  *) die "MEGAPHONE_TRIXIE_ROOT must be an absolute path (got '$ROOT')" ;;
esac
ROOT="${ROOT%/}"
[ "$ROOT" != "" ] && [ "$ROOT" != "/" ] || die "refusing to use / as the chroot"

t_start=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# --- mounts ---------------------------------------------------------------

# mount_once TYPE SRC DST: bind (or proc) mount unless DST already is a
# mount point, so running the script again never stacks mounts.
mount_once() {
  local kind="$1" src="$2" dst="$3"
  mkdir -p "$dst"
  if mountpoint -q "$dst"; then
    return 0
  fi
  if [ "$kind" = proc ]; then
    mount -t proc proc "$dst"
  else
    mount --bind "$src" "$dst"
  fi
  log "mounted $dst"
}

# /proc for erl and apt; /dev for /dev/null, /dev/urandom; /dev/pts for the
# pty-driven remote shell (test/harness Shell) and apt's terminal handling.
# A bind of /dev does not carry /dev/pts along, hence its own mount.
ensure_mounts() {
  mount_once proc proc "$1/proc"
  mount_once bind /dev "$1/dev"
  mount_once bind /dev/pts "$1/dev/pts"
}

# unmount_all DIR: unmounts everything mounted at or below DIR (deepest
# first). Used only before removing a half-built chroot, so that `rm` can
# never reach the host's /dev or /proc through a bind mount.
unmount_all() {
  local dir="$1" m i
  for i in 1 2 3; do
    mapfile -t mounts < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    [ "${#mounts[@]}" -eq 0 ] && return 0
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  done
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo \
    && die "could not unmount everything below $dir"
  return 0
}

# --- fast path --------------------------------------------------------------

mkdir -p "$(dirname "$ROOT")"
# One builder at a time (make test in two clones, say). Bounded wait.
exec 9>"$ROOT.lock"
flock -w 1800 9 || die "another trixie-chroot.sh held $ROOT.lock for 30 minutes"

case "${1:-}" in
  "") ;;
  --remove)
    # Mounts first: rm must never reach the host's /dev or /proc.
    # --one-file-system is the second guard.
    for d in "$ROOT" "$ROOT.partial"; do
      [ -e "$d" ] || continue
      unmount_all "$d"
      rm -rf --one-file-system "$d"
      log "removed $d"
    done
    rm -f "$ROOT.debootstrap.log"
    exit 0
    ;;
  *) die "unknown argument '$1' (only --remove)" ;;
esac

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ]; then
  ensure_mounts "$ROOT"
  log "ready: $ROOT (cached; checked in $(elapsed "$t_start")s)"
  exit 0
fi

# --- cold build ---------------------------------------------------------------

log "building $SUITE chroot in $ROOT (not cached, or built from another recipe)"

if ! command -v debootstrap >/dev/null; then
  t=$(date +%s.%N)
  log "installing debootstrap on the host"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends debootstrap; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap
  fi
  log "debootstrap installed in $(elapsed "$t")s"
fi

# debootstrap works in ROOT.partial, renamed to ROOT once it succeeded: an
# interrupted run leaves only ROOT.partial, which the next run throws away.
if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  partial="$ROOT.partial"
  if [ -e "$partial" ]; then
    log "removing an unfinished earlier attempt ($partial)"
    unmount_all "$partial"
    rm -rf --one-file-system "$partial"
  fi
  if [ -e "$ROOT" ]; then
    # ROOT without apt-get is not a chroot we made; never delete it.
    die "$ROOT exists but is not a finished chroot; remove it (after unmounting) and retry"
  fi
  t=$(date +%s.%N)
  log "debootstrap --variant=minbase $SUITE (Debian's default mirror)"
  timeout 1800 debootstrap --variant=minbase "$SUITE" "$partial" >"$ROOT.debootstrap.log" 2>&1 || {
    tail -n 30 "$ROOT.debootstrap.log" >&2
    unmount_all "$partial"
    die "debootstrap failed (full log: $ROOT.debootstrap.log)"
  }
  unmount_all "$partial"
  mv "$partial" "$ROOT"
  log "debootstrap done in $(elapsed "$t")s"
fi

# Package maintainer scripts must never start services inside the chroot
# (the standard Debian mechanism, honoured by invoke-rc.d).
printf '#!/bin/sh\n# megaphone: no services start in this chroot\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"

# Short node names end in @localhost: it must resolve inside the chroot too.
if ! grep -qsE '^[[:space:]]*127\.0\.0\.1[[:space:]].*\blocalhost\b' "$ROOT/etc/hosts"; then
  printf '127.0.0.1\tlocalhost\n' >>"$ROOT/etc/hosts"
  log "added localhost to $ROOT/etc/hosts"
fi

ensure_mounts "$ROOT"

# in_chroot SECS CMD...: runs CMD in the chroot with a plain environment,
# killed after SECS seconds. The lock (fd 9) is not handed down.
in_chroot() {
  local secs="$1"
  shift
  timeout "$secs" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive chroot "$ROOT" "$@" 9>&-
}

# PIDs of beam processes whose root is the chroot (an install that starts a
# node despite policy-rc.d).
chroot_beams() {
  local p
  for p in $(pgrep -f beam 2>/dev/null || true); do
    [ "$(readlink "/proc/$p/root" 2>/dev/null || true)" = "$ROOT" ] && echo "$p"
  done
  return 0
}

t=$(date +%s.%N)
before="$(chroot_beams)"
log "apt-get install ${PACKAGES[*]} (inside the chroot)"
if ! in_chroot 1800 apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$ROOT/var/log/megaphone-apt.log" 2>&1; then
  log "install failed; apt-get update and retry"
  in_chroot 600 apt-get update -q >>"$ROOT/var/log/megaphone-apt.log" 2>&1 || true
  in_chroot 1800 apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$ROOT/var/log/megaphone-apt.log" 2>&1 || {
    tail -n 30 "$ROOT/var/log/megaphone-apt.log" >&2
    die "apt-get install in the chroot failed (full log: $ROOT/var/log/megaphone-apt.log)"
  }
fi
for pid in $(chroot_beams); do
  grep -qx "$pid" <<<"$before" && continue
  log "stopping a node the install started in the chroot (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
done
in_chroot 300 apt-get clean
log "packages installed in $(elapsed "$t")s"

# Check what the tests rely on, as the chroot sees it.
otp="$(in_chroot 60 erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().' 2>&1)" \
  || die "erl does not run in the chroot: $otp"
in_chroot 60 sh -c 'command -v erlc >/dev/null' || die "erlc missing in the chroot"
ebin="$(cd "$ROOT" && ls -d usr/lib/*/ejabberd-*/ebin usr/lib/erlang/lib/ejabberd-*/ebin 2>/dev/null | head -n1 || true)"
[ -n "$ebin" ] && [ -f "$ROOT/$ebin/ejabberd.app" ] || die "ejabberd's ebin not found in the chroot"
log "OTP $otp, ejabberd in /$ebin"

printf '%s' "$RECIPE" >"$STAMP"
log "ready: $ROOT (built in $(elapsed "$t_start")s)"
