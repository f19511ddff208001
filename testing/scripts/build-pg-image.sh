#!/usr/bin/env bash
# Builds the PostgreSQL image the Docker backend of lagrouter-testing runs,
# from Debian's packages, with no container registry:
#
#   mmdebstrap --variant=minbase bookworm + postgresql-15  ->  docker import
#
# Usage: build-pg-image.sh [TAG]     (default: lagrouter/postgres:15)
#
# Idempotent: when the engine already has TAG it prints so and does nothing.
# Safe to run concurrently: builds are serialised with flock(1), and a
# process that waited re-checks before building. Needs root (mmdebstrap in
# root mode, and apt-get to install mmdebstrap when it is missing) and a
# Debian mirror: LAGROUTER_PG_IMAGE_MIRROR (default: deb.debian.org with the
# updates and security suites).
#
# The image holds the server binaries (PATH includes
# /usr/lib/postgresql/15/bin), a `postgres` user owning
# /var/lib/postgresql/data, and no database cluster: the harness runs initdb
# or pg_basebackup itself. LLVM (only used for JIT), documentation and
# translations are left out.
set -euo pipefail

TAG=${1:-lagrouter/postgres:15}
SUITE=bookworm
PG_MAJOR=15
LOCK=${LAGROUTER_PG_IMAGE_LOCK:-${TMPDIR:-/tmp}/lagrouter-pg-image.lock}

say() { printf 'build-pg-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "no Docker engine answers (is the daemon running, DOCKER_HOST set?)"

present() { docker image inspect "$TAG" >/dev/null 2>&1; }

if present; then
  say "image $TAG is present; nothing to do"
  exit 0
fi

exec 9>>"$LOCK"
if ! flock -n 9; then
  say "another build holds $LOCK; waiting for it"
  flock 9
fi
if present; then
  say "image $TAG was built meanwhile; nothing to do"
  exit 0
fi

started=$SECONDS
if ! command -v mmdebstrap >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "mmdebstrap is missing; install it (apt-get install mmdebstrap) or run as root"
  say "installing mmdebstrap with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq mmdebstrap >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq mmdebstrap; } \
    || die "could not install mmdebstrap"
fi
[ "$(id -u)" = 0 ] || die "building the root file system needs root (mmdebstrap in root mode)"

work=$(mktemp -d "${TMPDIR:-/tmp}/lagrouter-pg-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

mirrors=()
[ -n "${LAGROUTER_PG_IMAGE_MIRROR:-}" ] && mirrors+=("$LAGROUTER_PG_IMAGE_MIRROR")

say "building $TAG: Debian $SUITE (minbase) + postgresql-$PG_MAJOR with mmdebstrap"
# No default cluster from the package's postinst; no docs, man pages,
# translations; no LLVM or its Z3 solver (the server runs without JIT when llvmjit.so is
# absent).
mmdebstrap \
  --quiet \
  --variant=minbase \
  --include="postgresql-$PG_MAJOR" \
  --aptopt='Acquire::Languages "none"' \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/lib/*/libLLVM*' \
  --dpkgopt='path-exclude=/usr/lib/*/libz3*' \
  --dpkgopt="path-exclude=/usr/lib/postgresql/$PG_MAJOR/lib/llvmjit*" \
  --dpkgopt="path-exclude=/usr/lib/postgresql/$PG_MAJOR/lib/bitcode/*" \
  --essential-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d" && echo "create_main_cluster = false" > "$1/etc/postgresql-common/createcluster.d/lagrouter.conf"' \
  --customize-hook='chroot "$1" install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
  "$SUITE" "$work/rootfs.tar" "${mirrors[@]}"
say "root file system: $(du -h "$work/rootfs.tar" | cut -f1) ($((SECONDS - started)) s)"

say "importing into the engine as $TAG"
docker import \
  --message "lagrouter-testing: Debian $SUITE minbase + postgresql-$PG_MAJOR" \
  --change "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PGDATA=/var/lib/postgresql/data' \
  --change 'LABEL org.lagrouter.image=postgres-debian' \
  --change 'USER postgres' \
  --change 'WORKDIR /var/lib/postgresql' \
  --change 'EXPOSE 5432' \
  --change 'CMD ["postgres"]' \
  "$work/rootfs.tar" "$TAG" >/dev/null
say "built $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')) in $((SECONDS - started)) s"
