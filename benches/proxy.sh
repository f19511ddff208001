#!/usr/bin/env bash
# Proxy benchmark: pgbench -S (select-only) through lagrouter-proxy compared
# with the primary directly and with PgBouncer (transaction pooling), plus
# the proxy's memory with 1,000 idle client connections.
#
# Run from anywhere in the workspace (as root or as a normal user):
#
#   bash benches/proxy.sh                      # 3 rounds x 3 modes x 3 targets x 10 s
#   ROUNDS=1 DURATION=5 bash benches/proxy.sh  # quick look
#
# What it does, all on 127.0.0.1 and in a temporary directory:
#   1. builds lagrouter-proxy (cargo build --release -p lagrouter-proxy;
#      PROXY_BIN=path skips the build) and installs PgBouncer with apt-get
#      when it is missing;
#   2. starts a PostgreSQL primary (initdb) and REPLICAS streaming replicas
#      (pg_basebackup), as the postgres OS user when run as root, and
#      initialises pgbench tables (scale SCALE) on the primary;
#   3. starts PgBouncer (pool_mode = transaction, as the postgres user when
#      root) and lagrouter-proxy (generated TOML config over the primary
#      and the replicas; one instance per policy in PROXY_POLICIES, default
#      read-your-writes);
#   4. runs `pgbench -n -S -M <mode> -c <clients> -j THREADS -T DURATION` for
#      modes simple, extended, prepared and each client count in CLIENTS
#      against: the primary directly, PgBouncer, lagrouter-proxy (and the
#      BASELINE_BIN build of it, when given). ROUNDS rounds; within a round
#      every mode x target runs once per client count, the order rotating
#      from round to round, so slow phases of a shared machine hit every
#      target alike. Pooler CPU is read once every client is connected (so
#      that 1,000 logins do not count as query work) and divided by the
#      transactions of that window (TPS x its length);
#   5. prints a markdown table per client count of medians over rounds:
#      TPS, average latency, TPS relative to direct and to PgBouncer,
#      pooler CPU per transaction and how many runs succeeded;
#   6. opens IDLE_CLIENTS (1,000) idle client connections (pgbench clients
#      sleeping in `\sleep`) to the proxy and then to PgBouncer and reads each
#      one's VmRSS from /proc/<pid>/status. After rounds with many clients
#      the heaps have grown already and idle clients look free: measure
#      memory with small CLIENTS (the default 8).
# Every process it starts is stopped by an EXIT/INT/TERM trap.
#
# Environment: ROUNDS (3), DURATION (10, seconds per run), CLIENTS ("8";
# e.g. "8 100 1000"), BASELINE_BIN (another lagrouter-proxy binary, run as
# "baseline" targets for before/after comparisons),
# THREADS (2), SCALE (10), MODES ("simple extended prepared"), REPLICAS (2),
# POOL_SIZE (20, server connections per node in both poolers),
# IDLE_CLIENTS (1000), PROXY_POLICIES ("read-your-writes"; e.g.
# "read-your-writes eventual" adds a proxy per policy as a target),
# PROXY_WORKERS (unset: the proxy's default, half the CPUs;
# e.g. "1 2" adds a proxy per value, named .../w1, .../w2), PG_BIN
# (pg_config --bindir), PROXY_BIN,
# PGBOUNCER_BIN (default: the system's pgbouncer), SKIP_MEMORY=1,
# RYW_DURATION (DURATION; 0 skips the read-your-writes latency run),
# CHARTS_DIR (unset; e.g. docs/bench: writes the results there and draws
# them as SVG with benches/charts.sh).
# Results are in BENCHMARKS.md.

set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
MODES=${MODES:-"simple extended prepared"}
REPLICAS=${REPLICAS:-2}
POOL_SIZE=${POOL_SIZE:-20}
IDLE_CLIENTS=${IDLE_CLIENTS:-1000}
PROXY_POLICIES=${PROXY_POLICIES:-read-your-writes}
SKIP_MEMORY=${SKIP_MEMORY:-0}
PG_BIN=${PG_BIN:-$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PASSWORD=postgres
export PGPASSWORD=$PASSWORD PGUSER=postgres PGDATABASE=postgres PGHOST=127.0.0.1
export PGCONNECT_TIMEOUT=10

log() { printf '[proxy.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- run as the postgres user when root -------------------------------------
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' OS user"
  as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
else
  as_pg() { "$@"; }
fi

WORK=$(mktemp -d /tmp/lagrouter-proxy-bench.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres: "$WORK"

DATADIRS=()
PIDS=() # processes started in the background (proxy, pgbench idle clients)
PGB_PIDFILE="$WORK/pgbouncer.pid"
PGB_PID=""

cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null
  done
  for d in "${DATADIRS[@]}"; do
    as_pg "$PG_BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
  done
  sleep 0.2
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null && return
  # Fallback: a random port nobody listens on.
  local p
  while :; do
    p=$((20000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}

# --- tools --------------------------------------------------------------------
[ -x "$PG_BIN/initdb" ] || die "PostgreSQL server binaries not found in $PG_BIN (set PG_BIN)"
command -v pgbench >/dev/null || PATH="$PG_BIN:$PATH"
command -v pgbench >/dev/null || die "pgbench not found"
# PgBouncer: PGBOUNCER_BIN (e.g. 1.25 built by ../shared/peers/build-pgbouncer.sh),
# else the system's, installed with apt-get when missing (Debian's 1.18
# cannot run -M prepared in transaction pooling).
if [ -n "${PGBOUNCER_BIN:-}" ]; then
  [ -x "$PGBOUNCER_BIN" ] || die "no PgBouncer binary at $PGBOUNCER_BIN"
elif ! command -v pgbouncer >/dev/null; then
  log "installing pgbouncer"
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >/dev/null 2>&1 ||
      { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >/dev/null 2>&1; } ||
      log "could not install pgbouncer; its rows will be missing"
  else
    log "pgbouncer is missing and we are not root; its rows will be missing"
  fi
fi
PGBOUNCER_BIN=${PGBOUNCER_BIN:-$(command -v pgbouncer || true)}
if [ -z "${PROXY_BIN:-}" ]; then
  log "building lagrouter-proxy (release)"
  (cd "$ROOT" && cargo build --release -q -p lagrouter-proxy) || die "cargo build failed"
  PROXY_BIN="$ROOT/target/release/lagrouter-proxy"
fi
[ -x "$PROXY_BIN" ] || die "no proxy binary at $PROXY_BIN"
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --- the cluster --------------------------------------------------------------
PRIMARY_PORT=$(free_port)
log "initdb primary (port $PRIMARY_PORT)"
echo "$PASSWORD" >"$WORK/pwfile"
[ "$(id -u)" = 0 ] && chown postgres: "$WORK/pwfile"
as_pg "$PG_BIN/initdb" -D "$WORK/primary" -U postgres --pwfile="$WORK/pwfile" -A scram-sha-256 \
  --auth-local=trust -E UTF8 --locale=C -N >"$WORK/initdb.log" 2>&1 || {
  cat "$WORK/initdb.log" >&2
  die "initdb failed"
}
cat >>"$WORK/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PRIMARY_PORT
unix_socket_directories = '$WORK'
max_connections = 300
shared_buffers = 128MB
fsync = off
wal_level = replica
max_wal_senders = 10
hot_standby = on
logging_collector = off
EOF
cat >"$WORK/primary/pg_hba.conf" <<EOF
local all all trust
local replication all trust
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
EOF
DATADIRS+=("$WORK/primary")
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w start >/dev/null || die "primary did not start"

REPLICA_PORTS=()
for i in $(seq 1 "$REPLICAS"); do
  port=$(free_port)
  log "pg_basebackup replica$i (port $port)"
  as_pg env PGPASSWORD=$PASSWORD "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
    -D "$WORK/replica$i" -R -X stream -c fast >"$WORK/basebackup$i.log" 2>&1 || {
    cat "$WORK/basebackup$i.log" >&2
    die "pg_basebackup failed"
  }
  echo "port = $port" >>"$WORK/replica$i/postgresql.conf"
  DATADIRS+=("$WORK/replica$i")
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/replica$i" -l "$WORK/replica$i.log" -w start >/dev/null ||
    die "replica$i did not start"
  REPLICA_PORTS+=("$port")
done

log "pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -p "$PRIMARY_PORT" >"$WORK/pgbench-init.log" 2>&1 || {
  cat "$WORK/pgbench-init.log" >&2
  die "pgbench -i failed"
}
psql -X -q -p "$PRIMARY_PORT" -c "CHECKPOINT" >/dev/null
target_lsn=$(psql -X -At -p "$PRIMARY_PORT" -c "SELECT pg_current_wal_flush_lsn()")
for port in "${REPLICA_PORTS[@]}"; do
  for _ in $(seq 1 600); do
    ok=$(psql -X -At -p "$port" -c "SELECT pg_last_wal_replay_lsn() >= '$target_lsn'::pg_lsn" 2>/dev/null || true)
    [ "$ok" = t ] && break
    sleep 0.1
  done
  [ "$ok" = t ] || die "replica on port $port did not catch up"
done

# --- PgBouncer ----------------------------------------------------------------
PGB_PORT=""
if [ -n "$PGBOUNCER_BIN" ]; then
  PGB_PORT=$(free_port)
  printf '"postgres" "%s"\n' "$PASSWORD" >"$WORK/userlist.txt"
  cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PRIMARY_PORT dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $((IDLE_CLIENTS + 500))
ignore_startup_parameters = extra_float_digits
; 1.21+: prepared statements in transaction pooling (older versions warn
; and ignore it)
max_prepared_statements = 200
logfile = $WORK/pgbouncer.log
pidfile = $PGB_PIDFILE
EOF
  [ "$(id -u)" = 0 ] && chown postgres: "$WORK/userlist.txt" "$WORK/pgbouncer.ini"
  # Not daemonised: our own child (a simple command, so $! is pgbouncer
  # itself once setpriv has exec'd it), which we stop and reap.
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups -- "$PGBOUNCER_BIN" "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
  else
    "$PGBOUNCER_BIN" "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
  fi
  PGB_PID=$!
  PIDS+=("$PGB_PID")
  for _ in $(seq 1 50); do
    psql -X -At -p "$PGB_PORT" -c "SELECT 1" >/dev/null 2>&1 && break
    sleep 0.1
  done
  if ! psql -X -At -p "$PGB_PORT" -c "SELECT 1" >/dev/null 2>&1; then
    log "pgbouncer does not answer; its rows will be missing"
    tail -5 "$WORK/pgbouncer.log" >&2 || true
    PGB_PORT=""
  fi
fi

# --- lagrouter-proxy (one instance per policy) ---------------------------------
declare -A T_PORT T_PID T_ADMIN T_RSS_START
T_PORT[direct]=$PRIMARY_PORT
if [ -n "$PGB_PORT" ]; then
  T_PORT[pgbouncer]=$PGB_PORT
  T_PID[pgbouncer]=$PGB_PID
fi
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
PROXY_TARGETS=()
for policy in $PROXY_POLICIES; do
for workers in ${PROXY_WORKERS:-default}; do
  name="lagrouter-proxy"
  [ "$policy" != read-your-writes ] && name="lagrouter-proxy/$policy"
  tag=$policy
  if [ "$workers" != default ] && [ "$(echo "$PROXY_WORKERS" | wc -w)" -gt 1 ]; then
    name="$name/w$workers"
    tag="$policy-w$workers"
  fi
  port=$(free_port)
  admin=$(free_port)
  cfg="$WORK/proxy-$tag.toml"
  {
    cat <<EOF
[proxy]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
max_client_connections = $((IDLE_CLIENTS + 500))
EOF
    [ "$workers" != default ] && echo "workers = $workers"
    cat <<EOF

[routing]
policy = "$policy"

[pool]
size = $POOL_SIZE

[[nodes]]
name = "primary"
host = "127.0.0.1"
port = $PRIMARY_PORT
role = "primary"
EOF
    i=1
    for rport in "${REPLICA_PORTS[@]}"; do
      printf '\n[[nodes]]\nname = "replica%s"\nhost = "127.0.0.1"\nport = %s\nrole = "replica"\n' "$i" "$rport"
      i=$((i + 1))
    done
    printf '\n[[users]]\nname = "postgres"\npassword = "%s"\nauth = "scram-sha-256"\n' "$PASSWORD"
  } >"$cfg"
  RUST_LOG=${RUST_LOG:-warn} "$PROXY_BIN" --config "$cfg" >"$WORK/proxy-$tag.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 100); do
    psql -X -At -p "$port" -c "SELECT 1" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! psql -X -At -p "$port" -c "SELECT 1" >/dev/null 2>&1; then
    log "$name does not answer; its rows will be missing"
    tail -20 "$WORK/proxy-$tag.log" >&2 || true
    continue
  fi
  T_PORT[$name]=$port
  T_PID[$name]=$pid
  T_ADMIN[$name]=$admin
  T_RSS_START[$name]=$(rss_kb "$pid")
  PROXY_TARGETS+=("$name")
  # One baseline per policy (it may predate the workers key).
  if [ -n "${BASELINE_BIN:-}" ] && [ "$workers" = "$(echo "${PROXY_WORKERS:-default}" | awk '{print $1}')" ]; then
    bname="baseline"
    [ "$policy" != read-your-writes ] && bname="baseline/$policy"
    bport=$(free_port)
    badmin=$(free_port)
    sed -e "s/127.0.0.1:$port/127.0.0.1:$bport/" -e "s/127.0.0.1:$admin/127.0.0.1:$badmin/" -e "/^workers = /d" "$cfg" >"$WORK/baseline-$policy.toml"
    RUST_LOG=${RUST_LOG:-warn} "$BASELINE_BIN" --config "$WORK/baseline-$policy.toml" >"$WORK/baseline-$policy.log" 2>&1 &
    bpid=$!
    PIDS+=("$bpid")
    for _ in $(seq 1 100); do
      psql -X -At -p "$bport" -c "SELECT 1" >/dev/null 2>&1 && break
      sleep 0.1
    done
    T_PORT[$bname]=$bport
    T_PID[$bname]=$bpid
    T_ADMIN[$bname]=$badmin
    T_RSS_START[$bname]=$(rss_kb "$bpid")
    PROXY_TARGETS+=("$bname")
  fi
done
done

# --- pgbench rounds -----------------------------------------------------------
TARGETS=(direct)
[ -n "$PGB_PORT" ] && TARGETS+=(pgbouncer)
TARGETS+=("${PROXY_TARGETS[@]}")
pid_of() { echo "${T_PID[$1]:-}"; }
port_of() { echo "${T_PORT[$1]}"; }
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # user + system CPU ticks of pid $1 (0 without a pid)
  if [ -n "$1" ]; then awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; else echo 0; fi
}
established() { # connections in state ESTABLISHED whose local port is $1
  local hex
  hex=$(printf '%04X' "$1")
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=":$hex" '$4 == "01" && substr($2, length($2) - 4) == p {n++} END {print n + 0}'
}
now_ms() { date +%s%3N; }
read -r -a MODE_LIST <<<"$MODES"
read -r -a CLIENT_LIST <<<"$CLIENTS"
RESULTS="$WORK/results.tsv" # round clients mode target ok tps latency_ms pooler_cpu_us_per_txn
: >"$RESULTS"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
runs=$((ROUNDS * ${#CLIENT_LIST[@]} * ${#MODE_LIST[@]} * ${#TARGETS[@]}))
log "pgbench: $ROUNDS rounds x ${#CLIENT_LIST[@]} client counts x ${#MODE_LIST[@]} modes x ${#TARGETS[@]} targets x ${DURATION}s (~$((runs * (DURATION + 2)))s)"
n=0
for round in $(seq 1 "$ROUNDS"); do
  for clients in "${CLIENT_LIST[@]}"; do
    combos=()
    for mode in "${MODE_LIST[@]}"; do
      for target in "${TARGETS[@]}"; do
        combos+=("$mode $target")
      done
    done
    # Rotate the order by round.
    k=$(((round - 1) * (${#TARGETS[@]} + 1) % ${#combos[@]}))
    ordered=("${combos[@]:k}" "${combos[@]:0:k}")
    for combo in "${ordered[@]}"; do
      read -r mode target <<<"$combo"
      n=$((n + 1))
      out="$WORK/pgbench-$round-$clients-$mode-${target//\//_}.log"
      pid=$(pid_of "$target")
      port=$(port_of "$target")
      threads=$THREADS
      [ "$clients" -lt "$threads" ] && threads=$clients
      timeout $((DURATION + 120)) pgbench -n -S -M "$mode" -c "$clients" -j "$threads" -T "$DURATION" \
        -p "$port" >"$out" 2>&1 &
      pb=$!
      # Pooler CPU from the moment every client is connected.
      while kill -0 "$pb" 2>/dev/null && [ "$(established "$port")" -lt "$clients" ]; do
        sleep 0.05
      done
      cpu0=$(cpu_ticks "$pid")
      t0=$(now_ms)
      wait "$pb" && rc=0 || rc=$?
      cpu1=$(cpu_ticks "$pid")
      t1=$(now_ms)
      tps=$(awk -F'[ =]+' '/^tps = .*without initial connection time/ {print $2}' "$out")
      cpu_us=$(awk -v d=$((cpu1 - cpu0)) -v tps="${tps:-0}" -v ms=$((t1 - t0)) -v hz="$CLK_TCK" -v p="$pid" \
        'BEGIN {if (p == "" || tps == 0 || ms <= 0) print "-"; else printf "%.1f", d / hz * 1e6 / (tps * ms / 1000)}')
      lat=$(awk '/^latency average = / {print $4}' "$out")
      failed=$(awk '/^number of failed transactions: / {print $5}' "$out")
      aborted=$(grep -c 'client [0-9]* aborted' "$out" || true)
      ok=1
      if [ "$rc" != 0 ] || [ -z "$tps" ] || [ "${failed:-0}" != 0 ] || [ "$aborted" != 0 ]; then
        ok=0
        err=$(grep -m1 -iE 'error|aborted|fatal' "$out" || true)
        log "run $n/$runs c=$clients $mode $target FAILED (exit $rc): ${err:-see $out}"
      else
        log "run $n/$runs c=$clients $mode $target: $tps tps, $lat ms, ${cpu_us} us/txn"
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$clients" "$mode" "$target" "$ok" "${tps:-0}" "${lat:-0}" "$cpu_us" >>"$RESULTS"
    done
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print ""; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

for clients in "${CLIENT_LIST[@]}"; do
  echo
  echo "## pgbench -S, $clients clients, $THREADS threads, ${DURATION}s per run, $ROUNDS rounds (medians), scale $SCALE"
  echo
  echo "$(nproc) CPUs, loopback; PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), $("${PGBOUNCER_BIN:-pgbouncer}" --version 2>/dev/null | head -1 || echo 'no PgBouncer'), lagrouter-proxy over 1 primary + $REPLICAS replicas; loadavg $LOAD_BEFORE -> $LOAD_AFTER"
  echo
  echo "| mode | target | TPS | latency avg ms | TPS vs direct | TPS vs PgBouncer | pooler CPU µs/txn | CPU vs PgBouncer | runs ok |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  for mode in "${MODE_LIST[@]}"; do
    sel() { awk -F'\t' -v c="$clients" -v m="$mode" -v t="$1" -v col="$2" '$2==c && $3==m && $4==t && $5==1 && $col!="-" {print $col}' "$RESULTS" | median; }
    direct_tps=$(sel direct 6)
    pgb_tps=$(sel pgbouncer 6)
    pgb_cpu=$(sel pgbouncer 8)
    for target in "${TARGETS[@]}"; do
      tps=$(sel "$target" 6)
      lat=$(sel "$target" 7)
      cpu=$(sel "$target" 8)
      oks=$(awk -F'\t' -v c="$clients" -v m="$mode" -v t="$target" '$2==c && $3==m && $4==t {n++; ok+=$5} END {printf "%d/%d", ok, n}' "$RESULTS")
      if [ -z "$tps" ]; then
        echo "| $mode | $target | failed | – | – | – | – | – | $oks |"
        continue
      fi
      ratio() { awk -v a="$1" -v b="${2:-0}" 'BEGIN {if (a != "" && b > 0) printf "%.2f", a / b; else print "–"}'; }
      printf '| %s | %s | %.0f | %.3f | %s | %s | %s | %s | %s |\n' "$mode" "$target" "$tps" "$lat" \
        "$(ratio "$tps" "$direct_tps")" "$(ratio "$tps" "$pgb_tps")" "${cpu:-–}" "$(ratio "$cpu" "$pgb_cpu")" "$oks"
    done
  done
done

# Where each proxy sent the work (from its admin endpoint).
echo
for name in "${PROXY_TARGETS[@]}"; do
  admin=${T_ADMIN[$name]}
  metrics=$(curl -s --max-time 5 "http://127.0.0.1:$admin/metrics" 2>/dev/null || true)
  routed=$(printf '%s\n' "$metrics" | awk '/^lagrouter_proxy_routed_total\{/ && $NF > 0 {
      t = $0; sub(/.*target="/, "", t); sub(/".*/, "", t);
      n = $0; sub(/.*node="/, "", n); sub(/".*/, "", n);
      printf "%s%s/%s=%d", sep, t, n, $NF; sep = ", " }')
  fallbacks=$(printf '%s\n' "$metrics" | awk '/^lagrouter_proxy_fallbacks_total/ {s += $NF} END {print s + 0}')
  echo "- $name routed (target/node=count, all modes): ${routed:-n/a}; fallbacks: $fallbacks"
done

# --- memory with idle clients -------------------------------------------------
# Opens IDLE_CLIENTS idle connections to port $1 and measures VmRSS of pid
# $2 before and with them; sets RSS_BEFORE, RSS_AFTER (KiB) and CONNECTED.
idle_rss() {
  local port=$1 pid=$2 idle_pid
  RSS_BEFORE=$(rss_kb "$pid")
  printf '\\sleep %s s\n' "$((DURATION + 50))" >"$WORK/idle.sql"
  pgbench -n -c "$IDLE_CLIENTS" -j 4 -t 1 -f "$WORK/idle.sql" -p "$port" >"$WORK/idle-$port.log" 2>&1 &
  idle_pid=$!
  PIDS+=("$idle_pid")
  CONNECTED=0
  for _ in $(seq 1 300); do
    CONNECTED=$(established "$port")
    [ "$CONNECTED" -ge "$IDLE_CLIENTS" ] && break
    kill -0 "$idle_pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 1
  CONNECTED=$(established "$port")
  RSS_AFTER=$(rss_kb "$pid")
  kill "$idle_pid" 2>/dev/null || true
  wait "$idle_pid" 2>/dev/null || true
  if [ "$CONNECTED" -lt "$IDLE_CLIENTS" ]; then
    log "only $CONNECTED of $IDLE_CLIENTS idle clients connected to port $port:"
    grep -m3 -iE 'error|fatal' "$WORK/idle-$port.log" >&2 || true
  fi
}
if [ "$SKIP_MEMORY" != 1 ]; then
  echo
  echo "## Memory with $IDLE_CLIENTS idle client connections (VmRSS)"
  echo
  echo "| process | RSS at start MiB | RSS before idle clients MiB | RSS with idle clients MiB | client connections open | KiB per idle client |"
  echo "|---|---:|---:|---:|---:|---:|"
  for name in "${PROXY_TARGETS[@]}"; do
    kill -0 "${T_PID[$name]}" 2>/dev/null || continue
    idle_rss "${T_PORT[$name]}" "${T_PID[$name]}"
    awk -v s="${T_RSS_START[$name]}" -v b="$RSS_BEFORE" -v a="$RSS_AFTER" -v c="$CONNECTED" -v n="$IDLE_CLIENTS" -v t="$name" \
      'BEGIN {printf "| %s | %.1f | %.1f | %.1f | %d | %.1f |\n", t, s/1024, b/1024, a/1024, c, (a-b)/n}'
  done
  if [ -n "$PGB_PORT" ] && kill -0 "$PGB_PID" 2>/dev/null; then
    idle_rss "$PGB_PORT" "$PGB_PID"
    awk -v b="$RSS_BEFORE" -v a="$RSS_AFTER" -v c="$CONNECTED" -v n="$IDLE_CLIENTS" \
      'BEGIN {printf "| pgbouncer | – | %.1f | %.1f | %d | %.1f |\n", b/1024, a/1024, c, (a-b)/n}'
  fi
fi
# --- read-your-writes workload: read latency percentiles ----------------------
# Each client writes a row and reads rows back (weights 1:2); a read-back
# reads the row the client wrote last (pgbench keeps variables per client),
# so through lagrouter-proxy it carries the write's token. Latencies from
# pgbench's per-transaction log, reads only (script 1).
LATENCY="$WORK/ryw-latency.tsv" # target p50_ms p90_ms p99_ms p999_ms
: >"$LATENCY"
if [ "${RYW_DURATION:-$DURATION}" != 0 ]; then
  psql -X -q -p "$PRIMARY_PORT" -c "CREATE TABLE IF NOT EXISTS ryw_bench(id int PRIMARY KEY, n int NOT NULL)" >/dev/null
  printf '\\set wid random(1, 100000)\nINSERT INTO ryw_bench VALUES (:wid, 0) ON CONFLICT (id) DO UPDATE SET n = ryw_bench.n + 1;\n' >"$WORK/ryw-write.sql"
  printf 'SELECT n FROM ryw_bench WHERE id = :wid;\n' >"$WORK/ryw-read.sql"
  echo
  RYW_CLIENTS=${CLIENT_LIST[0]}
  echo "## Read-your-writes workload: read-back latency (write:read 1:2, $RYW_CLIENTS clients, ${RYW_DURATION:-$DURATION}s)"
  echo
  echo "| target | reads | p50 ms | p90 ms | p99 ms | p99.9 ms |"
  echo "|---|---:|---:|---:|---:|---:|"
  for target in "${TARGETS[@]}"; do
    prefix="$WORK/ryw-${target//\//_}"
    (cd "$WORK" && timeout $((${RYW_DURATION:-$DURATION} + 60)) pgbench -n -c "$RYW_CLIENTS" -j "$THREADS" \
      -T "${RYW_DURATION:-$DURATION}" -D wid=1 -f "$WORK/ryw-write.sql@1" -f "$WORK/ryw-read.sql@2" \
      --log --log-prefix="$prefix" -p "$(port_of "$target")" >"$prefix.out" 2>&1) || {
      log "ryw $target failed: $(grep -m1 -iE 'error|fatal|aborted' "$prefix.out" || true)"
      continue
    }
    # Log lines: client transaction time_us script_no epoch epoch_us.
    cat "$prefix".* 2>/dev/null | awk '$4 == 1 {print $3 / 1000}' | sort -g >"$prefix.reads"
    awk -v t="$target" '{a[NR] = $1} END {
        if (NR == 0) exit
        q = "0.5 0.9 0.99 0.999"; split(q, qs, " ")
        line = t; md = "| " t " | " NR
        for (i = 1; i <= 4; i++) { k = int(qs[i] * NR); if (k < 1) k = 1; line = line "\t" a[k]; md = md " | " sprintf("%.3f", a[k]) }
        print line >> "'"$LATENCY"'"; print md " |" }' "$prefix.reads"
  done
fi

# Charts (SVG) from these results, when CHARTS_DIR is set.
if [ -n "${CHARTS_DIR:-}" ]; then
  cp "$RESULTS" "$CHARTS_DIR/results.tsv" 2>/dev/null || { mkdir -p "$CHARTS_DIR" && cp "$RESULTS" "$CHARTS_DIR/results.tsv"; }
  cp "$LATENCY" "$CHARTS_DIR/ryw-latency.tsv"
  bash "$(dirname "$0")/charts.sh" "$CHARTS_DIR/results.tsv" "$CHARTS_DIR/ryw-latency.tsv" "$CHARTS_DIR"
fi
echo
log "done"
