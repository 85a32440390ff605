#!/usr/bin/env bash
# logdiff.sh: how fast logdiff compares two real replicas, next to reading
# the same bytes (cat) and a naive key-by-key comparison (ldb scan + cmp).
# Run with --help.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: bench/logdiff.sh [--size GIB] [--rounds N] [--bin DIR] [--threads N] [--keep] [--help]

Builds two real replicas on 127.0.0.1 (ports chosen by the kernel, a shared
secret file, data under one mktemp -d directory): an active replicad and one
standby (--follow, --commit async, --wal-sync none), loads the active with
redis-benchmark (SET, 4096-byte values, -P 16, 8 clients, random keys out of
10 million) until the active's data directory holds at least --size GiB
(du -sb, checked after each batch), waits until the standby has applied the
active's last LSN and holds as many keys, and stops both with SIGTERM.
Then, round by round, with a warm page cache (every file read once just
before) and, if /proc/sys/vm/drop_caches can be written, a cold one (sync,
echo 3 > drop_caches just before), it times:
  raw read   cat of every file of both data directories to /dev/null (one
             process): the disk / page-cache speed for the same bytes
  logdiff    logdiff --no-progress --json A B (must exit 0, "identical");
             MiB/s = bytes of both directories / wall time. Its own report
             (seconds, mib_per_second over bytes_hashed) is shown as well.
  ldb+cmp    ldb --db=DIR/db --column_family=default scan of A, then of B,
             to files, then cmp: a naive single-threaded key-by-key check
             (the default column family only; no WAL)
It prints the median per method over the rounds: seconds, MiB/s, and the
speed relative to the raw read of the same cache state (raw seconds / method
seconds; 1.00 = as fast as reading the bytes once).

Options:
  --size GIB     data to load into the active, in GiB (default 2; decimals ok)
  --rounds N     rounds, methods interleaved within each (default 3)
  --bin DIR      directory with replicad and logdiff (default: build/tools
                 under the repository root)
  --threads N    pass --threads N to logdiff (default: logdiff's own default)
  --keep         keep the temporary directory (data dirs, logs, JSON)
  -h, --help     show this help

Needs redis-benchmark, redis-cli, ldb (rocksdb-tools), cmp. The cold runs need
root (drop_caches); without it only warm runs are made, and it says so. Every
process it starts is stopped on exit, Ctrl-C or error. Exit status 0 when
every run completed and every comparison found the replicas identical;
1 on a failure (the directory is then kept).
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/build/tools"; SIZE=2; ROUNDS=3; THREADS=""; KEEP=0
VALUE=4096; KEYSPACE=10000000; CLIENTS=8
work=""; pids=(); keep_work=0; notes=(); failed=0

die() { echo "logdiff.sh: $*" >&2; keep_work=1; exit 1; }
note() { notes+=("$*"); echo "   note: $*"; }
now() { echo "${EPOCHREALTIME/,/.}"; }
median() { grep -E '^[0-9.eE+-]+$' | sort -g | awk '{ v[n++] = $1 } END { if (!n) print "n/a"; else if (n % 2) print v[(n-1)/2]; else print (v[n/2-1] + v[n/2]) / 2 }'; }
cleanup() {
  local p
  trap '' INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null
  done
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "$KEEP" = 1 ] || [ "$keep_work" = 1 ]; then echo "logdiff.sh: kept $work" >&2; else rm -rf "$work"; fi
  fi
}
info() { redis-cli -h 127.0.0.1 -p "$1" INFO replication 2>/dev/null | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'; }
dbsize() { redis-cli -h 127.0.0.1 -p "$1" DBSIZE 2>/dev/null | tr -d '\r'; }
dir_bytes() { find "$@" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# start_node ID ARGS...: sets NODE_PID NODE_REPL NODE_CLIENT
start_node() {
  local id=$1; shift
  "$BIN/replicad" --id "$id" --data-dir "$work/$id" --listen 127.0.0.1:0 --client-listen 127.0.0.1:0 \
    --secret-file "$work/secret" --commit async --wal-sync none --log-level warn "$@" > "$work/$id.out" 2> "$work/$id.log" &
  NODE_PID=$!; pids+=("$NODE_PID")
  local deadline=$((SECONDS + 30)) ready
  until ready=$(grep -m1 '^replicad: ready' "$work/$id.out" 2>/dev/null); do
    kill -0 "$NODE_PID" 2>/dev/null || { tail "$work/$id.log" >&2; die "node $id exited at start"; }
    [ $SECONDS -lt $deadline ] || die "node $id not ready within 30 s"
    sleep 0.05
  done
  NODE_REPL=$(grep -o 'replication=127\.0\.0\.1:[0-9]*' <<<"$ready" | cut -d: -f2)
  NODE_CLIENT=$(grep -o 'client=127\.0\.0\.1:[0-9]*' <<<"$ready" | cut -d: -f2)
  [ -n "$NODE_REPL" ] && [ -n "$NODE_CLIENT" ] || die "node $id: no ports in: $ready"
}

build_replicas() {
  start_node a; local a_pid=$NODE_PID a_repl=$NODE_REPL a_cli=$NODE_CLIENT
  start_node b --follow "127.0.0.1:$a_repl"; local b_pid=$NODE_PID b_cli=$NODE_CLIENT
  local deadline=$((SECONDS + 30))
  until [ "$(info "$a_cli" connected_slaves)" = 1 ]; do
    [ $SECONDS -lt $deadline ] || die "the standby did not connect within 30 s"; sleep 0.1
  done
  local target have prev=0 n=0 total=0 per=$((3 * VALUE)) t0; t0=$(now)
  target=$(awk -v g="$SIZE" 'BEGIN { printf "%.0f", g * 1073741824 }')
  while have=$(du -sb "$work/a" 2>/dev/null | cut -f1); [ "$have" -lt "$target" ]; do
    # batches sized by the growth per SET seen so far (3 copies at first: WAL, RocksDB log, SST)
    [ "$n" = 0 ] || [ $(( (have - prev) / n )) -lt "$VALUE" ] || per=$(( (have - prev) / n ))
    n=$(( (target - have) / per )); [ "$n" -ge 2000 ] || n=2000; prev=$have
    redis-benchmark -h 127.0.0.1 -p "$a_cli" -t set -n "$n" -d "$VALUE" -P 16 -c "$CLIENTS" -r "$KEYSPACE" -q \
      > "$work/bench.out" 2> "$work/bench.err" &
    local bp=$!; pids+=("$bp"); wait "$bp" || die "redis-benchmark failed: $(tail -c 300 "$work/bench.err")"
    kill -0 "$a_pid" 2>/dev/null && kill -0 "$b_pid" 2>/dev/null || die "a node died during the load"
    total=$((total + n))
    printf '   loaded %d SETs, active data dir %s MiB\n' "$total" "$(mib "$(du -sb "$work/a" | cut -f1)")"
  done
  echo "   load: $total SETs in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s"
  local last applied; deadline=$((SECONDS + 300))
  while last=$(info "$a_cli" replica_last_lsn); applied=$(info "$b_cli" replica_applied_lsn)
        [ -z "$last" ] || [ "$applied" != "$last" ] || [ "$(dbsize "$a_cli")" != "$(dbsize "$b_cli")" ]; do
    [ $SECONDS -lt $deadline ] || die "the standby applied ${applied:-?} of ${last:-?} after 300 s"; sleep 0.2
  done
  echo "   caught up: active last LSN $last, standby applied $applied, $(dbsize "$a_cli") keys on each"
  local p rc; kill -TERM "$b_pid" "$a_pid"
  for p in "$b_pid" "$a_pid"; do wait "$p"; rc=$?; [ "$rc" = 0 ] || note "replicad pid $p exited with status $rc after SIGTERM"; done
  pids=()
  for p in a b; do [ -s "$work/$p.log" ] && note "node $p logged: $(head -c 200 "$work/$p.log" | head -1)"; done
}

declare -A T   # T[cache/method] = "seconds seconds ..."
declare -A OWN_S OWN_R HASHED
warm_up() { find "$work/a" "$work/b" -type f -exec cat {} + > /dev/null; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }

run_method() {  # run_method CACHE METHOD ROUND
  local c=$1 m=$2 r=$3 t0 t1 rc=0 out="$work/round$3-$1-$2"
  if [ "$c" = warm ]; then warm_up; else cold; fi
  case $m in
    raw) t0=$(now); find "$work/a" "$work/b" -type f -exec cat {} + > /dev/null; rc=$?; t1=$(now) ;;
    logdiff)
      t0=$(now); TMPDIR="$work" "$BIN/logdiff" --no-progress --json ${THREADS:+--threads "$THREADS"} "$work/a" "$work/b" > "$out.json"; rc=$?; t1=$(now)
      grep -q '"verdict":"identical"' "$out.json" || rc=99
      OWN_S[$c]+="$(grep -o '"seconds":[^,]*' "$out.json" | cut -d: -f2) "
      OWN_R[$c]+="$(grep -o '"mib_per_second":[^,]*' "$out.json" | cut -d: -f2) "
      HASHED[$c]=$(grep -o '"bytes_hashed":[0-9]*' "$out.json" | cut -d: -f2)
      grep -q '"notes":\[\]' "$out.json" || note "logdiff notes: $(grep -o '"notes":.*' "$out.json")" ;;
    ldb)
      t0=$(now)
      ldb --db="$work/a/db" --column_family=default scan > "$out.a" && ldb --db="$work/b/db" --column_family=default scan > "$out.b" &&
        cmp -s "$out.a" "$out.b"; rc=$?; t1=$(now)
      [ -s "$out.a" ] || rc=98; rm -f "$out.a" "$out.b" ;;
  esac
  local s; s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  T[$c/$m]+="$s "
  printf '   round %d/%d  %-4s %-8s %8.3f s%s\n' "$r" "$ROUNDS" "$c" "$m" "$s" "$([ "$rc" = 0 ] || echo "  FAILED (status $rc)")"
  if [ "$rc" != 0 ]; then failed=1; keep_work=1; note "round $r $c $m failed with status $rc"; fi
}

main() {
  while [ $# -gt 0 ]; do
    case $1 in
      --size|--rounds|--bin|--threads) [ $# -ge 2 ] || die "$1 needs a value" ;;&
      --size) SIZE=$2; shift 2 ;;
      --rounds) ROUNDS=$2; shift 2 ;;
      --bin) BIN=$2; shift 2 ;;
      --threads) THREADS=$2; shift 2 ;;
      --keep) KEEP=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) echo "logdiff.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
  done
  [[ $SIZE =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v s="$SIZE" 'BEGIN { exit !(s > 0) }' || die "--size must be a positive number of GiB"
  [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
  [ -z "$THREADS" ] || [[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
  local t; for t in replicad logdiff; do [ -x "$BIN/$t" ] || die "no executable $BIN/$t (build it, or pass --bin DIR)"; done
  for t in redis-benchmark redis-cli ldb cmp; do command -v "$t" >/dev/null || die "$t not found"; done

  trap cleanup EXIT; trap 'echo "logdiff.sh: interrupted" >&2; exit 130' INT; trap 'exit 143' TERM
  work=$(mktemp -d "${TMPDIR:-/tmp}/ldbench.XXXXXX") || die "mktemp failed"
  echo "ldbench-$$-$RANDOM" > "$work/secret"; chmod 600 "$work/secret"
  local caches=(warm)
  if (sync; echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null; then caches+=(cold); else note "cannot write /proc/sys/vm/drop_caches: warm page cache only"; fi
  echo "logdiff.sh: $(date '+%F %T'), $(nproc) CPUs, $(awk '/MemAvailable/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) available, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "  bin $BIN; --size $SIZE GiB, $ROUNDS round(s), caches: ${caches[*]}; data under $work"
  build_replicas
  local bytes; bytes=$(dir_bytes "$work/a" "$work/b")
  for t in a b; do
    echo "   $t: $(mib "$(dir_bytes "$work/$t")") MiB (wal/ $(mib "$(dir_bytes "$work/$t/wal")"), db/ *.sst $(mib "$(find "$work/$t/db" -name '*.sst' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')"), db/ *.log $(mib "$(find "$work/$t/db" -name '*.log' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')"))"
  done
  awk -v b="$bytes" '/MemAvailable/ { exit !(b > 0.6 * $2 * 1024) }' /proc/meminfo &&
    note "both directories ($(mib "$bytes") MiB) are more than 60% of the available memory: 'warm' may not be all in cache"

  local r c m
  for ((r = 1; r <= ROUNDS; r++)); do
    for c in "${caches[@]}"; do for m in raw logdiff ldb; do run_method "$c" "$m" "$r"; done; done
  done

  printf '\nMedian of %s round(s); both data directories: %s MiB in %s files; %s CPUs\n' "$ROUNDS" "$(mib "$bytes")" "$(find "$work/a" "$work/b" -type f | wc -l)" "$(nproc)"
  printf '%-5s %-34s %10s %10s %8s\n' cache method "median s" "MiB/s" "vs raw"
  local raw s own_s own_r
  for c in "${caches[@]}"; do
    raw=$(tr ' ' '\n' <<<"${T[$c/raw]}" | median)
    for m in raw logdiff ldb; do
      s=$(tr ' ' '\n' <<<"${T[$c/$m]}" | median)
      awk -v c="$c" -v m="$m" -v s="$s" -v r="$raw" -v b="$bytes" 'BEGIN {
        name = m == "raw" ? "raw read (cat, 1 process)" : m == "logdiff" ? "logdiff --json (wall)" : "ldb scan a, ldb scan b, cmp"
        printf "%-5s %-34s %10.3f %10.0f %7.2fx\n", c, name, s, b / 1048576 / s, r / s }'
      if [ "$m" = logdiff ]; then
        own_s=$(tr ' ' '\n' <<<"${OWN_S[$c]}" | median); own_r=$(tr ' ' '\n' <<<"${OWN_R[$c]}" | median)
        awk -v c="$c" -v s="$own_s" -v rr="$own_r" -v r="$raw" 'BEGIN {
          printf "%-5s %-34s %10.3f %10.0f %7.2fx\n", c, "  logdiff, its own report (*)", s, rr, r / s }'
      fi
    done
  done
  echo "(*) logdiff's \"seconds\" and \"mib_per_second\" (its verdict line's figures): $(mib "${HASHED[warm]}") MiB"
  echo "    hashed (bytes_hashed) per run, against $(mib "$bytes") MiB in the directories; its time covers opening the"
  echo "    nodes too. \"vs raw\": raw read seconds / its seconds."
  if [ ${#notes[@]} -gt 0 ]; then echo; echo "notes:"; printf '  %s\n' "${notes[@]}"; fi
  return "$failed"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
