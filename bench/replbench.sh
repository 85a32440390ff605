#!/usr/bin/env bash
# replbench.sh: end-to-end replication throughput with redis-benchmark.
#
# Drives redis-benchmark (SET, 100-byte values, 50 clients) at replicad in
# four configurations: a single node without standby, and an active with one
# standby under each commit rule (async, remote-write:1, remote-apply:1),
# and, when redis-server is installed, the same load against Redis alone and
# with a replica (the peer system). Every run gets fresh data directories and free ports on 127.0.0.1; the
# modes are interleaved round by round and the median per mode is reported,
# with the standby's replication lag read from the active's
# replica_standby_lag_seconds histogram on /metrics. Run with --help.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: bench/replbench.sh [--requests N] [--rounds N] [--replicad PATH] [--keep]
                          [--peer | --no-peer] [--help]

End-to-end replication benchmark. In one run it measures, with redis-benchmark
(SET only, 100-byte values, 50 clients, keys drawn at random from 100,000):
  single          one replicad, no standby (the baseline)
  async           active + one standby, --commit async
  remote-write:1  active + one standby, --commit remote-write:1
  remote-apply:1  active + one standby, --commit remote-apply:1
Every replicad runs with --wal-sync every, on 127.0.0.1 only, ports chosen by
the kernel (port 0, read back from replicad's "ready" line), a shared secret file,
and a fresh data directory under one mktemp -d directory. Each round runs the
four modes in the order above; after all rounds it prints, per mode, the
median over the rounds of: SET/s, client latency p50 and p99 (ms, as
redis-benchmark reports them), SET/s relative to the single node, and for the
modes with a standby the replication lag p50 and p99 (ms). The lag is the
active's replica_standby_lag_seconds histogram (time from the local WAL
append of a record until the standby acknowledged it durably), scraped from
/metrics after the standby has caught up, with quantiles interpolated within
buckets as Prometheus' histogram_quantile does; "apply p99" is the same for
replica_standby_apply_lag_seconds (until the standby applied the record, so
that a read there sees it). Each run's line also shows the active's mean
and p99 fdatasync time (replica_wal_fsync_latency_seconds), and the
standby's p99 ("sb fsync p99" in the table): every lag sample contains one
of the standby's fdatasyncs. A replicad without those metrics (or without
--metrics-listen) gives "n/a". "active us/SET" and "standby us/SET" are
each node's CPU time during the load (/proc/PID/stat) per SET; their ratio
between single and async says what share of a single node's throughput an
active on cores of its own would keep, if CPU-bound.

The peer: when redis-server is installed, each round also runs the same load
against Redis (the version Debian ships) with the same durability, an
append-only file fsynced before each reply (appendonly yes, appendfsync
always; no RDB snapshots, no AOF rewrite during the load), alone (redis-single) and with one
replica on the same machine (redis-replica, which follows its master as a
standby follows the active under --commit async). Printed last, in a table
of its own: SET/s, latency, CPU per SET, and the share of its own throughput
Redis keeps with a replica beside the share replicad keeps.

Options:
  --requests N     SET requests per run (default 100000)
  --rounds N       runs per mode, interleaved round by round (default 3)
  --replicad PATH  the replicad binary (default: build/tools/replicad under
                   the repository root)
  --peer           require the Redis modes (fail without redis-server)
  --no-peer        skip the Redis modes
  --keep           keep the temporary directory (data dirs, node logs,
                   redis-benchmark output, /metrics pages); by default it is
                   removed, run by run
  -h, --help       show this help

Needs redis-benchmark and redis-cli (tools/setup.sh installs them, and
redis-server for the peer); curl for the lag (otherwise bash's
/dev/tcp is used). Every process it starts is stopped when it exits, also on
Ctrl-C or an error. If a node fails to start, dies, or a load does not finish
in time, it stops with exit status 1, prints the node's log, and keeps the
temporary directory for inspection. Exit status 0 when every run completed.
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUESTS=100000
ROUNDS=3
REPLICAD="$ROOT/build/tools/replicad"
KEEP=0
CLIENTS=50
VALUE_SIZE=100
KEYSPACE=100000
MODES=(single async remote-write:1 remote-apply:1)
PEER=auto           # auto: the Redis modes when redis-server is installed
PEER_MODES=()
START_TIMEOUT=30    # s: the ready line, the first PING, the standby connecting
CATCHUP_TIMEOUT=60  # s: the standby holding everything after the load
STOP_TIMEOUT=15     # s: SIGTERM to exit, before SIGKILL

work=""
pids=()         # every process started and not yet reaped
keep_work=0
notes=()        # odd things seen, printed at the end

nap_pid=""      # the sleep of the current nap

die() { echo "replbench: $*" >&2; exit 1; }
# nap [SECONDS]: sleep (default 0.05 s) in the background and wait for it
# with the wait builtin, which a trapped signal interrupts at once. (A SIGINT
# sent to this script alone during a foreground sleep would be dropped: bash
# assumes the child handled it when the child does not die of it.)
nap() { sleep "${1:-0.05}" & nap_pid=$!; wait "$nap_pid"; nap_pid=""; }
note() { notes+=("$*"); echo "   note: $*"; }

cleanup() {
  local p deadline
  trap '' INT TERM   # a second Ctrl-C must not cut the cleanup short
  [ -z "$nap_pid" ] || kill "$nap_pid" 2>/dev/null
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  deadline=$((SECONDS + 5))
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  pids=()
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "$KEEP" = 1 ] || [ "$keep_work" = 1 ]; then
      echo "replbench: kept $work" >&2
    else
      rm -rf "$work"
    fi
  fi
}

forget_pid() {  # forget_pid PID: drop PID from pids
  local p rest=()
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || rest+=("$p"); done
  pids=("${rest[@]}")
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# ---------------------------------------------------------------- parsing

# median: numbers on stdin (one a line, "n/a" ignored); prints the median or n/a
median() {
  grep -E '^-?[0-9.]+([eE][-+]?[0-9]+)?$' | sort -g |
    awk '{ v[n++] = $1 } END {
      if (n == 0) { print "n/a"; exit }
      if (n % 2) print v[(n - 1) / 2]; else print (v[n / 2 - 1] + v[n / 2]) / 2 }'
}

# hist_quantile Q NAME: Prometheus text on stdin; prints the Q-quantile of the
# histogram NAME (buckets summed over all label sets, so several standbys
# give their combined distribution) in the histogram's unit, or n/a.
# Same rules as Prometheus' histogram_quantile: rank = Q * count(+Inf); the
# first bucket whose cumulative count reaches the rank; linear interpolation
# between its lower bound (0 for the first bucket) and its upper bound; the
# +Inf bucket yields the highest finite bound.
hist_quantile() {
  local q=$1 name=$2
  awk -v name="${name}_bucket" '
    index($0, name "{") == 1 && match($0, /le="[^"]*"/) {
      le = substr($0, RSTART + 4, RLENGTH - 5)
      rest = $0; sub(/^[^}]*}[ \t]*/, "", rest); split(rest, f, /[ \t]+/)
      if (le == "+Inf" || le == "Inf" || le == "inf") le = "+Inf"
      if (!(le in count)) order[n++] = le
      count[le] += f[1]
    }
    END { for (i = 0; i < n; i++) print order[i], count[order[i]] }' |
    sort -g -k1,1 |
    awk -v q="$q" '
      BEGIN { n = 0 }
      { ub[n] = $1; c[n] = $2 + 0; n++ }
      END {
        if (n < 2 || ub[n - 1] != "+Inf") { print "n/a"; exit }
        for (i = 1; i < n; i++) if (c[i] < c[i - 1]) c[i] = c[i - 1]   # keep it monotonic
        total = c[n - 1]
        if (total <= 0) { print "n/a"; exit }
        rank = q * total
        b = 0
        while (b < n - 1 && c[b] < rank) b++
        if (b == n - 1) { printf "%.9g\n", ub[n - 2]; exit }
        if (b == 0 && ub[0] + 0 <= 0) { printf "%.9g\n", ub[0]; exit }
        start = 0; prev = 0
        if (b > 0) { start = ub[b - 1]; prev = c[b - 1] }
        printf "%.9g\n", start + (ub[b] - start) * ((rank - prev) / (c[b] - prev))
      }'
}

# metric_sum NAME: Prometheus text on stdin; prints NAME summed over its label sets, or n/a
metric_sum() {
  awk -v name="$1" '
    index($0, name "{") == 1 || index($0, name " ") == 1 {
      rest = $0
      if (index(rest, "}")) sub(/^[^}]*}/, "", rest); else sub(/^[^ \t]+/, "", rest)
      sub(/^[ \t]+/, "", rest); split(rest, f, /[ \t]+/); s += f[1]; seen = 1 }
    END { if (seen) printf "%.17g\n", s; else print "n/a" }'
}

# hist_count NAME: Prometheus text on stdin; prints the summed NAME_count or n/a
hist_count() { metric_sum "${1}_count" | awk '{ if ($1 == "n/a") print; else printf "%.0f\n", $1 }'; }

# parse_bench FILE: prints "rps p50_ms p99_ms" from redis-benchmark output
# (--csv with a header, or the normal output's throughput and latency
# summaries); missing values are n/a.
parse_bench() {
  local f=$1
  if [ "$BENCH_CSV" = 1 ]; then
    tr -d '\r' < "$f" | awk -F, '
      { for (i = 1; i <= NF; i++) gsub(/"/, "", $i) }
      $1 == "test" { for (i = 1; i <= NF; i++) col[$i] = i; next }
      $1 == "SET" && ("rps" in col) {
        p50 = ("p50_latency_ms" in col) ? $(col["p50_latency_ms"]) : "n/a"
        p99 = ("p99_latency_ms" in col) ? $(col["p99_latency_ms"]) : "n/a"
        print $(col["rps"]), p50, p99; found = 1 }
      END { if (!found) print "n/a n/a n/a" }'
  else
    tr '\r' '\n' < "$f" | awk '
      /throughput summary:/ { for (i = 1; i <= NF; i++) if ($i == "summary:") rps = $(i + 1) }
      /^SET: [0-9.]+ requests per second/ && rps == "" { rps = $2 }
      hdr == 1 { for (i = 1; i <= NF; i++) v[h[i]] = $i; hdr = 2 }
      hdr == 0 && seen && /p50/ { for (i = 1; i <= NF; i++) h[i] = $i; hdr = 1 }
      /latency summary \(msec\):/ { seen = 1 }
      END {
        if (rps == "") rps = "n/a"
        p50 = ("p50" in v) ? v["p50"] : "n/a"; p99 = ("p99" in v) ? v["p99"] : "n/a"
        print rps, p50, p99 }'
  fi
}

# cpu_busy: percent of all CPUs busy over the next second (/proc/stat), to
# show how quiet the machine was before a round
cpu_busy() {
  local a b
  a=$(head -1 /proc/stat); nap 1; b=$(head -1 /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN {
    n = split(a, x, / +/); split(b, y, / +/)
    for (i = 2; i <= n; i++) { t += y[i] - x[i]; if (i == 5 || i == 6) idle += y[i] - x[i] }
    if (t > 0) printf "%.0f", 100 * (t - idle) / t; else print "?" }'
}

# proc_cpu PID: the CPU time the process has used, in clock ticks
proc_cpu() {
  awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# ---------------------------------------------------------------- nodes

# start_node DIR ID [replicad args...]: starts replicad, waits for its ready
# line and a PING; sets NODE_PID, NODE_REPL, NODE_CLIENT, NODE_METRICS
start_node() {
  local dir=$1 id=$2; shift 2
  local args=(--id "$id" --data-dir "$dir/$id" --listen 127.0.0.1:0 --client-listen 127.0.0.1:0
              --secret-file "$work/secret" --wal-sync every --log-level warn)
  [ "$HAVE_METRICS" = 1 ] && args+=(--metrics-listen 127.0.0.1:0)
  "$REPLICAD" "${args[@]}" "$@" > "$dir/$id.out" 2> "$dir/$id.log" &
  NODE_PID=$!
  pids+=("$NODE_PID")
  local deadline=$((SECONDS + START_TIMEOUT))
  until grep -q '^replicad: ready' "$dir/$id.out" 2>/dev/null; do
    if ! kill -0 "$NODE_PID" 2>/dev/null; then
      fail_run "$dir" "node $id exited before it was ready"
    fi
    [ $SECONDS -lt $deadline ] || fail_run "$dir" "node $id not ready within ${START_TIMEOUT}s"
    nap
  done
  local ready
  ready=$(grep -m1 '^replicad: ready' "$dir/$id.out")
  NODE_REPL=$(grep -o 'replication=127\.0\.0\.1:[0-9]*' <<<"$ready" | cut -d: -f2)
  NODE_CLIENT=$(grep -o 'client=127\.0\.0\.1:[0-9]*' <<<"$ready" | cut -d: -f2)
  NODE_METRICS=$(grep -o 'metrics=[0-9]*' <<<"$ready" | cut -d= -f2)
  if [ -z "$NODE_REPL" ] || [ -z "$NODE_CLIENT" ]; then
    fail_run "$dir" "node $id: cannot read its ports from: $ready"
  fi
  [ "${NODE_METRICS:-0}" != 0 ] || NODE_METRICS=""
  until [ "$(redis-cli -h 127.0.0.1 -p "$NODE_CLIENT" PING 2>/dev/null)" = PONG ]; do
    [ $SECONDS -lt $deadline ] || fail_run "$dir" "node $id does not answer PING on port $NODE_CLIENT"
    kill -0 "$NODE_PID" 2>/dev/null || fail_run "$dir" "node $id exited"
    nap
  done
}

# info_field PORT NAME: a field of the active's INFO replication
info_field() {
  redis-cli -h 127.0.0.1 -p "$1" INFO replication 2>/dev/null | tr -d '\r' |
    awk -F: -v k="$2" '$1 == k { print $2; exit }'
}

# standby_offset PORT: slave0's offset (the standby's durable LSN) on the active
standby_offset() {
  redis-cli -h 127.0.0.1 -p "$1" INFO replication 2>/dev/null | tr -d '\r' |
    grep -m1 '^slave0:' | grep -o 'offset=[0-9]*' | cut -d= -f2
}

# scrape PORT: the /metrics page
scrape() {
  if [ "$HAVE_CURL" = 1 ]; then
    curl -sf --max-time 10 "http://127.0.0.1:$1/metrics"
  else
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timeout 10 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" &&
      printf "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" >&3 &&
      cat <&3' _ "$1" | tr -d '\r' | sed '1,/^$/d'
  fi
}

# stop_nodes DIR ID PID ...: SIGTERM, wait (SIGKILL after STOP_TIMEOUT), note odd exits
stop_nodes() {
  local dir=$1; shift
  local id pid rc deadline
  while [ $# -ge 2 ]; do
    id=$1 pid=$2; shift 2
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do nap; done
    if kill -0 "$pid" 2>/dev/null; then
      note "$(basename "$dir") node $id did not stop within ${STOP_TIMEOUT}s of SIGTERM; SIGKILLed"
      kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null; rc=$?
    forget_pid "$pid"
    [ "$rc" = 0 ] || note "$(basename "$dir") node $id exited with status $rc after SIGTERM"
  done
}

# fail_run DIR MESSAGE: print what the nodes logged and stop (the trap cleans up)
fail_run() {
  local dir=$1 f; shift
  echo "replbench: $(basename "$dir"): $*" >&2
  for f in "$dir"/*.log "$dir"/*.out "$dir"/bench.err; do
    [ -s "$f" ] || continue
    echo "---- $(basename "$f") (last 20 lines)" >&2
    tail -n 20 "$f" >&2
  done
  keep_work=1
  exit 1
}

# ---------------------------------------------------------------- one run

# drive_load DIR CLIENT_PORT A_PID [B_PID]: runs redis-benchmark against
# CLIENT_PORT while watching the nodes; sets L_RPS, L_P50, L_P99 and each
# node's CPU per SET during the load, L_AUS and L_BUS (µs; "-" without B)
drive_load() {
  local dir=$1 a_client=$2 a_pid=$3 b_pid=${4:-}
  # The load, in the background so that Ctrl-C is handled at once and the
  # nodes can be watched while it runs.
  local load_timeout=$((60 + REQUESTS / 200))
  local bench_args=(-h 127.0.0.1 -p "$a_client" -t set -n "$REQUESTS" -d "$VALUE_SIZE" -c "$CLIENTS" -r "$KEYSPACE")
  [ "$BENCH_CSV" = 1 ] && bench_args+=(--csv)
  local a_cpu0 b_cpu0=0 deadline
  a_cpu0=$(proc_cpu "$a_pid"); [ -z "$b_pid" ] || b_cpu0=$(proc_cpu "$b_pid")
  redis-benchmark "${bench_args[@]}" > "$dir/bench.out" 2> "$dir/bench.err" &
  local bench=$!
  pids+=("$bench")
  deadline=$((SECONDS + load_timeout))
  while kill -0 "$bench" 2>/dev/null; do
    kill -0 "$a_pid" 2>/dev/null || fail_run "$dir" "the active (or the only node) died during the load"
    [ -z "$b_pid" ] || kill -0 "$b_pid" 2>/dev/null || fail_run "$dir" "the standby died during the load"
    [ $SECONDS -lt $deadline ] || fail_run "$dir" "redis-benchmark did not finish within ${load_timeout}s"
    nap 0.2
  done
  wait "$bench"; local brc=$?
  # CPU per SET during the load (µs): what each node pays, whoever shares
  # the machine with it.
  local hz a_us b_us="-"
  hz=$(getconf CLK_TCK)
  a_us=$(awk -v c="$(( $(proc_cpu "$a_pid") - a_cpu0 ))" -v hz="$hz" -v n="$REQUESTS" 'BEGIN { printf "%.1f", c / hz * 1e6 / n }')
  [ -z "$b_pid" ] ||
    b_us=$(awk -v c="$(( $(proc_cpu "$b_pid") - b_cpu0 ))" -v hz="$hz" -v n="$REQUESTS" 'BEGIN { printf "%.1f", c / hz * 1e6 / n }')
  forget_pid "$bench"
  [ "$brc" = 0 ] || fail_run "$dir" "redis-benchmark exited with status $brc"
  if grep -v 'Could not fetch server CONFIG' "$dir/bench.err" | grep -q .; then
    note "$(basename "$dir") redis-benchmark stderr: $(grep -v 'Could not fetch server CONFIG' "$dir/bench.err" | head -3 | tr '\n' ' ')"
  fi
  read -r L_RPS L_P50 L_P99 < <(parse_bench "$dir/bench.out")
  [ "$L_RPS" != n/a ] || fail_run "$dir" "no SET result in the redis-benchmark output"
  L_AUS=$a_us L_BUS=$b_us
}

declare -A R_RPS R_P50 R_P99 R_LAG50 R_LAG99 R_ALAG99 R_SF99 R_ACPU R_BCPU

run_one() {
  local round=$1 mode=$2
  local dir="$work/round$round-${mode/:/-}"
  mkdir -p "$dir"
  local commit=async
  [ "$mode" = single ] || commit=$mode

  start_node "$dir" a --commit "$commit"
  local a_pid=$NODE_PID a_repl=$NODE_REPL a_client=$NODE_CLIENT a_metrics=$NODE_METRICS
  local b_pid="" b_metrics="" deadline
  if [ "$mode" != single ]; then
    start_node "$dir" b --follow "127.0.0.1:$a_repl"
    b_pid=$NODE_PID b_metrics=$NODE_METRICS
    deadline=$((SECONDS + START_TIMEOUT))
    until [ "$(info_field "$a_client" connected_slaves)" = 1 ]; do
      [ $SECONDS -lt $deadline ] || fail_run "$dir" "the standby did not connect within ${START_TIMEOUT}s"
      kill -0 "$b_pid" 2>/dev/null || fail_run "$dir" "the standby exited"
      nap
    done
  fi

  drive_load "$dir" "$a_client" "$a_pid" "$b_pid"
  local rps=$L_RPS p50=$L_P50 p99=$L_P99 a_us=$L_AUS b_us=$L_BUS

  local lag50=n/a lag99=n/a alag99=n/a lagtxt="" last=""
  if [ "$mode" != single ]; then
    # Let the standby acknowledge every record, so the histogram holds them all.
    local off
    last=$(info_field "$a_client" master_repl_offset)
    deadline=$((SECONDS + CATCHUP_TIMEOUT))
    while off=$(standby_offset "$a_client"); [ "${off:-x}" != "$last" ]; do
      if [ $SECONDS -ge $deadline ]; then
        note "$(basename "$dir") the standby held LSN ${off:-?} of $last after ${CATCHUP_TIMEOUT}s"
        break
      fi
      nap
    done
  fi
  local fsynctxt=""
  if [ -n "$a_metrics" ]; then
    if scrape "$a_metrics" > "$dir/metrics.txt"; then
      # The active's WAL: mean fdatasync time and records per fdatasync (a
      # slow disk or a busy machine shows here first).
      local recs syncs ssec
      recs=$(metric_sum replica_wal_records_total < "$dir/metrics.txt")
      syncs=$(metric_sum replica_wal_fsyncs_total < "$dir/metrics.txt")
      ssec=$(metric_sum replica_wal_fsync_seconds_total < "$dir/metrics.txt")
      fsynctxt=$(awk -v r="$recs" -v n="$syncs" -v t="$ssec" 'BEGIN {
        if (n != "n/a" && n > 0 && t != "n/a" && r != "n/a") printf "  fsync %.0f us, %.1f rec/fsync", t / n * 1e6, r / n }')
      local f99
      f99=$(hist_quantile 0.99 replica_wal_fsync_latency_seconds < "$dir/metrics.txt")
      [ "$f99" = n/a ] || [ -z "$fsynctxt" ] || fsynctxt+=$(awk -v s="$f99" 'BEGIN { printf " (p99 %.0f us)", s * 1e6 }')
      if [ "$mode" != single ]; then
        local v obs
        v=$(hist_quantile 0.5 replica_standby_lag_seconds < "$dir/metrics.txt")
        [ "$v" = n/a ] || lag50=$(awk -v s="$v" 'BEGIN { printf "%.3f", s * 1000 }')
        v=$(hist_quantile 0.99 replica_standby_lag_seconds < "$dir/metrics.txt")
        [ "$v" = n/a ] || lag99=$(awk -v s="$v" 'BEGIN { printf "%.3f", s * 1000 }')
        # Until applied there (a read on the standby sees it): replay lag.
        v=$(hist_quantile 0.99 replica_standby_apply_lag_seconds < "$dir/metrics.txt")
        [ "$v" = n/a ] || alag99=$(awk -v s="$v" 'BEGIN { printf "%.3f", s * 1000 }')
        obs=$(hist_count replica_standby_lag_seconds < "$dir/metrics.txt")
        if [ "$obs" != n/a ]; then
          lagtxt=" ($obs samples)"
          [ "$obs" -ge "$last" ] 2>/dev/null ||
            note "$(basename "$dir") the lag histogram has $obs samples for $last records"
        fi
      fi
    else
      note "$(basename "$dir") could not read /metrics on port $a_metrics"
    fi
  fi
  # The standby's fdatasync p99: one of them is inside every lag sample.
  local sf99=n/a
  if [ -n "$b_metrics" ]; then
    if scrape "$b_metrics" > "$dir/metrics-b.txt"; then
      local v
      v=$(hist_quantile 0.99 replica_wal_fsync_latency_seconds < "$dir/metrics-b.txt")
      [ "$v" = n/a ] || sf99=$(awk -v s="$v" 'BEGIN { printf "%.3f", s * 1000 }')
    else
      note "$(basename "$dir") could not read the standby's /metrics on port $b_metrics"
    fi
  fi

  # The standby first: stopped after its active, it would log (rightly) that
  # the active became unreachable, and that line would be noted as odd.
  if [ -n "$b_pid" ]; then stop_nodes "$dir" b "$b_pid" a "$a_pid"; else stop_nodes "$dir" a "$a_pid"; fi
  local f
  for f in "$dir"/a.log "$dir"/b.log; do
    [ -s "$f" ] && note "$(basename "$dir") $(basename "$f" .log) logged $(wc -l < "$f") line(s), first: $(head -1 "$f")"
  done

  R_RPS[$mode]+="$rps "; R_P50[$mode]+="$p50 "; R_P99[$mode]+="$p99 "
  R_LAG50[$mode]+="$lag50 "; R_LAG99[$mode]+="$lag99 "; R_ALAG99[$mode]+="$alag99 "; R_SF99[$mode]+="$sf99 "
  R_ACPU[$mode]+="$a_us "; R_BCPU[$mode]+="$b_us "
  local lagcol=""
  [ "$mode" = single ] || lagcol="  lag p50 $lag50 ms  p99 $lag99 ms  apply p99 $alag99 ms  standby fsync p99 $sf99 ms$lagtxt"
  printf '   round %d/%d  %-15s %7.0f SET/s  p50 %6s ms  p99 %7s ms  cpu/SET active %s us standby %s us%s%s\n' \
    "$round" "$ROUNDS" "$mode" "$rps" "$p50" "$p99" "$a_us" "$b_us" "$fsynctxt" "$lagcol"

  [ "$KEEP" = 1 ] || rm -rf "$dir"
  sync   # no run pays for the previous run's writeback
}

# ---------------------------------------------------------------- the peer

# free_port (redis-server cannot be given port 0)
. "$(dirname "${BASH_SOURCE[0]}")/../tools/ports.sh"

# start_redis DIR ID [redis-server args...]: starts redis-server on a free
# port with the durability replicad gets from --wal-sync every (an
# append-only file, fsync before the reply; no RDB snapshots, no AOF
# rewrite during the load) and no delay before a replica's first sync; waits
# for a PING. Sets NODE_PID and NODE_CLIENT.
start_redis() {
  local dir=$1 id=$2; shift 2
  local try port deadline
  mkdir -p "$dir/$id"
  for try in 1 2 3 4 5; do
    port=$(free_port)
    rm -f "$dir/$id.log"  # Redis appends: only this try's lines count
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir/$id" --daemonize no \
      --appendonly yes --appendfsync always --auto-aof-rewrite-percentage 0 --save '' \
      --repl-diskless-sync-delay 0 --loglevel warning --logfile "$dir/$id.log" "$@" > "$dir/$id.out" 2>&1 &
    NODE_PID=$!
    pids+=("$NODE_PID")
    deadline=$((SECONDS + START_TIMEOUT))
    while kill -0 "$NODE_PID" 2>/dev/null; do
      if [ "$(redis-cli -h 127.0.0.1 -p "$port" PING 2>/dev/null)" = PONG ]; then
        NODE_CLIENT=$port
        return 0
      fi
      [ $SECONDS -lt $deadline ] || fail_run "$dir" "redis-server $id does not answer PING on port $port"
      nap
    done
    wait "$NODE_PID" 2>/dev/null; forget_pid "$NODE_PID"
    # Another process took the port between the check and the bind: retry.
    grep -q 'Address already in use' "$dir/$id.log" 2>/dev/null || fail_run "$dir" "redis-server $id exited at start"
  done
  fail_run "$dir" "redis-server $id found no free port in 5 tries"
}

# run_redis ROUND MODE: the peer system under the same load: Redis with the
# same durability alone (redis-single), and with one replica that follows it
# as a standby follows the active under --commit async (redis-replica).
run_redis() {
  local round=$1 mode=$2
  local dir="$work/round$round-$mode"
  mkdir -p "$dir"
  start_redis "$dir" a
  local a_pid=$NODE_PID a_client=$NODE_CLIENT b_pid="" deadline
  if [ "$mode" = redis-replica ]; then
    start_redis "$dir" b --replicaof 127.0.0.1 "$a_client"
    b_pid=$NODE_PID
    deadline=$((SECONDS + START_TIMEOUT))
    local info
    until info=$(redis-cli -h 127.0.0.1 -p "$a_client" INFO replication 2>/dev/null); [[ $info == *slave0:*state=online* ]]; do
      [ $SECONDS -lt $deadline ] || fail_run "$dir" "the Redis replica was not online within ${START_TIMEOUT}s"
      kill -0 "$b_pid" 2>/dev/null || fail_run "$dir" "the Redis replica exited"
      nap
    done
  fi
  drive_load "$dir" "$a_client" "$a_pid" "$b_pid"
  if [ -n "$b_pid" ]; then
    # The replica holds everything before it is stopped (its offset is
    # reported about once a second).
    local off last
    last=$(info_field "$a_client" master_repl_offset)
    deadline=$((SECONDS + CATCHUP_TIMEOUT))
    # At least: the master's periodic PING to its replicas moves the offset on.
    while off=$(standby_offset "$a_client"); ! [ "${off:-0}" -ge "$last" ] 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        note "$(basename "$dir") the Redis replica held offset ${off:-?} of $last after ${CATCHUP_TIMEOUT}s"
        break
      fi
      nap
    done
    stop_nodes "$dir" b "$b_pid" a "$a_pid"
  else
    stop_nodes "$dir" a "$a_pid"
  fi
  R_RPS[$mode]+="$L_RPS "; R_P50[$mode]+="$L_P50 "; R_P99[$mode]+="$L_P99 "
  R_ACPU[$mode]+="$L_AUS "; R_BCPU[$mode]+="$L_BUS "
  printf '   round %d/%d  %-15s %7.0f SET/s  p50 %6s ms  p99 %7s ms  cpu/SET redis %s us replica %s us\n' \
    "$round" "$ROUNDS" "$mode" "$L_RPS" "$L_P50" "$L_P99" "$L_AUS" "$L_BUS"
  [ "$KEEP" = 1 ] || rm -rf "$dir"
  sync
}

# ---------------------------------------------------------------- main

main() {
  while [ $# -gt 0 ]; do
    case $1 in
      --requests) [ $# -ge 2 ] || die "--requests needs a value"; REQUESTS=$2; shift 2 ;;
      --requests=*) REQUESTS=${1#*=}; shift ;;
      --rounds) [ $# -ge 2 ] || die "--rounds needs a value"; ROUNDS=$2; shift 2 ;;
      --rounds=*) ROUNDS=${1#*=}; shift ;;
      --replicad) [ $# -ge 2 ] || die "--replicad needs a value"; REPLICAD=$2; shift 2 ;;
      --replicad=*) REPLICAD=${1#*=}; shift ;;
      --keep) KEEP=1; shift ;;
      --peer) PEER=yes; shift ;;
      --no-peer) PEER=no; shift ;;
      -h|--help) usage; exit 0 ;;
      *) echo "replbench: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
  done
  is_count "$REQUESTS" || die "--requests must be a positive integer, got '$REQUESTS'"
  is_count "$ROUNDS" || die "--rounds must be a positive integer, got '$ROUNDS'"
  [ -x "$REPLICAD" ] || die "no executable replicad at '$REPLICAD' (build it, or pass --replicad PATH)"
  command -v redis-benchmark >/dev/null || die "redis-benchmark not found"
  command -v redis-cli >/dev/null || die "redis-cli not found"
  if [ "$PEER" != no ]; then
    if command -v redis-server >/dev/null; then
      PEER_MODES=(redis-single redis-replica)
    elif [ "$PEER" = yes ]; then
      die "--peer: redis-server not found (apt-get install redis-server)"
    fi
  fi
  HAVE_CURL=0; command -v curl >/dev/null && HAVE_CURL=1
  # (not piped into grep -q: under pipefail, grep leaving early can fail the pipe)
  HAVE_METRICS=0; help_text=$("$REPLICAD" --help 2>/dev/null || true)
  [[ $help_text == *--metrics-listen* ]] && HAVE_METRICS=1
  # redis-benchmark 7 and later print p50/p99 in --csv; older ones do not.
  local bver
  bver=$(redis-benchmark --version 2>/dev/null | grep -o '[0-9][0-9.]*' | head -1)
  BENCH_CSV=0; [ "${bver%%.*}" -ge 7 ] 2>/dev/null && BENCH_CSV=1

  trap cleanup EXIT
  trap 'echo "replbench: interrupted" >&2; exit 130' INT
  trap 'echo "replbench: terminated" >&2; exit 143' TERM
  work=$(mktemp -d "${TMPDIR:-/tmp}/replbench.XXXXXX") || die "mktemp failed"
  echo "replbench-secret-$$-$RANDOM" > "$work/secret"
  chmod 600 "$work/secret"

  echo "replbench: $(date '+%Y-%m-%d %H:%M:%S'), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "  replicad: $REPLICAD"
  echo "  redis-benchmark ${bver:-?}: -t set -n $REQUESTS -d $VALUE_SIZE -c $CLIENTS -r $KEYSPACE$([ "$BENCH_CSV" = 1 ] && echo ' --csv')"
  echo "  --wal-sync every, $ROUNDS round(s) of: ${MODES[*]}; data under $work"
  if [ ${#PEER_MODES[@]} -gt 0 ]; then
    echo "  peer: $(redis-server --version | cut -d' ' -f1-3), appendonly yes, appendfsync always: ${PEER_MODES[*]}"
  elif [ "$PEER" = auto ]; then
    echo "  peer: no redis-server here, so no Redis modes (apt-get install redis-server)"
  fi
  [ "$HAVE_METRICS" = 1 ] || echo "  this replicad has no --metrics-listen: lag is n/a"

  local round mode
  for ((round = 1; round <= ROUNDS; round++)); do
    echo "   round $round/$ROUNDS: CPU $(cpu_busy)% busy in the second before it"
    for mode in "${MODES[@]}"; do run_one "$round" "$mode"; done
    for mode in "${PEER_MODES[@]}"; do run_redis "$round" "$mode"; done
  done

  local base
  base=$(tr ' ' '\n' <<<"${R_RPS[single]}" | median)
  echo
  echo "Median of $ROUNDS round(s), $REQUESTS SETs of $VALUE_SIZE B from $CLIENTS clients per run; load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  printf '%-16s %10s %8s %8s %10s %12s %12s %14s %16s %14s %15s\n' mode SET/s "p50 ms" "p99 ms" "vs single" "lag p50 ms" \
    "lag p99 ms" "apply p99 ms" "sb fsync p99 ms" "active us/SET" "standby us/SET"
  local rps p50 p99 l50 l99 a99 f99 acpu bcpu ratio async_ratio="n/a" async_lag99="n/a" single_cpu="" async_cpu=""
  for mode in "${MODES[@]}"; do
    rps=$(tr ' ' '\n' <<<"${R_RPS[$mode]}" | median)
    p50=$(tr ' ' '\n' <<<"${R_P50[$mode]}" | median)
    p99=$(tr ' ' '\n' <<<"${R_P99[$mode]}" | median)
    l50=$(tr ' ' '\n' <<<"${R_LAG50[$mode]}" | median)
    l99=$(tr ' ' '\n' <<<"${R_LAG99[$mode]}" | median)
    a99=$(tr ' ' '\n' <<<"${R_ALAG99[$mode]}" | median)
    f99=$(tr ' ' '\n' <<<"${R_SF99[$mode]}" | median)
    acpu=$(tr ' ' '\n' <<<"${R_ACPU[$mode]}" | median)
    bcpu="-"
    [ "$mode" = single ] || bcpu=$(tr ' ' '\n' <<<"${R_BCPU[$mode]}" | median)
    [ "$mode" = single ] && single_cpu=$acpu
    [ "$mode" = async ] && async_cpu=$acpu
    ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    if [ "$mode" = single ]; then l50="-"; l99="-"; a99="-"; f99="-"; fi
    [ "$l50" = n/a ] || [ "$l50" = "-" ] || l50=$(printf '%.3f' "$l50")
    [ "$l99" = n/a ] || [ "$l99" = "-" ] || l99=$(printf '%.3f' "$l99")
    [ "$a99" = n/a ] || [ "$a99" = "-" ] || a99=$(printf '%.3f' "$a99")
    [ "$f99" = n/a ] || [ "$f99" = "-" ] || f99=$(printf '%.3f' "$f99")
    [ "$mode" = async ] && { async_ratio=$ratio; async_lag99=$l99; }
    printf '%-16s %10.0f %8s %8s %10s %12s %12s %14s %16s %14s %15s\n' "$mode" "$rps" "$p50" "$p99" "${ratio}x" "$l50" "$l99" \
      "$a99" "$f99" "$acpu" "$bcpu"
  done
  echo
  local g1 g2
  g1=$(awk -v r="$async_ratio" 'BEGIN { if (r == "n/a") print "n/a"; else print (r >= 0.90 ? "met" : "missed") }')
  g2=$(awk -v l="$async_lag99" 'BEGIN { if (l == "n/a") print "n/a (no lag metric)"; else print (l < 1.0 ? "met" : "missed") }')
  echo "goal: async >= 90% of the single node's SET/s: ${async_ratio}x, $g1"
  echo "goal: async replication lag p99 < 1 ms: ${async_lag99} ms, $g2"
  # What the active alone pays for replication: on machines of its own,
  # where the standby's CPU is not taken from it, a CPU-bound active would
  # keep about this share of the single node's throughput.
  if [ -n "$single_cpu" ] && [ -n "$async_cpu" ]; then
    awk -v s="$single_cpu" -v a="$async_cpu" 'BEGIN { if (s > 0 && a > 0)
      printf "the active'"'"'s CPU per SET, single / async: %.1f / %.1f us (%.2fx of single'"'"'s throughput if CPU-bound on its own cores)\n", s, a, s / a }'
  fi
  if [ ${#PEER_MODES[@]} -gt 0 ]; then
    # The same load against the peer: what Redis keeps of its own
    # throughput with a replica on this machine, beside what replicad keeps.
    local rbase
    rbase=$(tr ' ' '\n' <<<"${R_RPS[redis-single]}" | median)
    echo
    echo "peer (same load, same rounds): Redis, appendonly yes, appendfsync always"
    printf '%-16s %10s %8s %8s %15s %12s %14s %15s\n' mode SET/s "p50 ms" "p99 ms" "vs redis-single" "vs single" \
      "node us/SET" "replica us/SET"
    for mode in "${PEER_MODES[@]}"; do
      rps=$(tr ' ' '\n' <<<"${R_RPS[$mode]}" | median)
      p50=$(tr ' ' '\n' <<<"${R_P50[$mode]}" | median)
      p99=$(tr ' ' '\n' <<<"${R_P99[$mode]}" | median)
      acpu=$(tr ' ' '\n' <<<"${R_ACPU[$mode]}" | median)
      bcpu="-"
      [ "$mode" = redis-single ] || bcpu=$(tr ' ' '\n' <<<"${R_BCPU[$mode]}" | median)
      printf '%-16s %10.0f %8s %8s %15s %12s %14s %15s\n' "$mode" "$rps" "$p50" "$p99" \
        "$(awk -v a="$rps" -v b="$rbase" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')" \
        "$(awk -v a="$rps" -v b="$base" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')" "$acpu" "$bcpu"
    done
    rps=$(tr ' ' '\n' <<<"${R_RPS[redis-replica]}" | median)
    awk -v r="$rps" -v b="$rbase" -v a="$async_ratio" 'BEGIN { if (b > 0)
      printf "with a replica on this machine Redis keeps %.2fx of its own throughput; replicad async keeps %sx\n", r / b, a }'
  fi
  if [ ${#notes[@]} -gt 0 ]; then
    echo
    echo "notes:"
    printf '  %s\n' "${notes[@]}"
  fi
}

# Sourcing the file (e.g. to test hist_quantile) defines the functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
