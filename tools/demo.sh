#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs the demo.
#
# Part 1, the write-ahead log alone: 8 writers, SIGKILL, a torn write,
# recovery, and proof that no acknowledged record was lost.
# Part 2, failover: a local etcd, then three replicad nodes with --etcd that
# elect an active (commit rule remote-write:1); a redis-benchmark write load
# with live lag; the active SIGKILLed mid-load, a standby promoted (the time
# it took is shown); the load moved to the new active; the old active back
# as a standby; then repctl status and the proof that all three replicas are
# identical (WALs, epoch histories, RocksDB contents): logdiff --live while
# they run, logdiff --strict on their directories once stopped; a summary.
#
#   tools/demo.sh                       install what is missing, build, run
#   tools/demo.sh --no-setup --build DIR   run with the binaries already in DIR (the test suite does)
set -euo pipefail
cd "$(dirname "$0")/.."
setup=1
build=build
while [ $# -gt 0 ]; do
  case "$1" in
    --no-setup) setup=0 ;;
    --build) build=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$setup" -eq 0 ] || bash tools/setup.sh >/dev/null
B=$build/tools
work=$(mktemp -d /tmp/replica-demo.XXXXXX)
pids=()
etcd_pid=""
cleanup() {
  local rc=$?
  for p in "${pids[@]}" $etcd_pid; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}" $etcd_pid; do wait "$p" 2>/dev/null || true; done
  if [ "$rc" -eq 0 ]; then rm -rf "$work"; else echo "demo: kept $work for a look (logs, data)"; fi
}
trap cleanup EXIT
echo "demo-secret" > "$work/secret"; chmod 600 "$work/secret"
field() { grep -o "$1:[0-9]*" | head -1 | cut -d: -f2; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
. tools/ports.sh  # free_port

start_etcd() {
  etcd_port=$(free_port)
  etcd_peer=$(free_port)
  etcd --name demo --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" --initial-cluster "demo=http://127.0.0.1:$etcd_peer" \
    --log-level error > "$work/etcd.log" 2>&1 &
  etcd_pid=$!
  local deadline=$((SECONDS + 30))
  until curl -sf "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; do
    kill -0 "$etcd_pid" 2>/dev/null || return 1  # a port was taken meanwhile: try others
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}
for attempt in 1 2 3 4 5; do
  start_etcd && break
  kill -9 "$etcd_pid" 2>/dev/null || true
  rm -rf "$work/etcd"
  [ "$attempt" -lt 5 ] || { echo "demo: etcd did not start:"; cat "$work/etcd.log"; exit 1; }
done

# start_node ID: starts replicad with --etcd, waits for its ready line, sets PID_<ID>, PORT_<ID>, CLIENT_<ID>
start_node() {
  local id=$1; shift
  rm -f "$work/$id.out"  # a restarted node's ready line must not be taken for its predecessor's
  "$B/replicad" --id "$id" --data-dir "$work/$id" --listen 127.0.0.1:0 --client-listen 127.0.0.1:0 \
    --secret-file "$work/secret" --wal-segment-size 1048576 --log-level warn \
    --etcd "127.0.0.1:$etcd_port" --cluster demo --commit remote-write:1 \
    > "$work/$id.out" 2>> "$work/$id.log" &
  pids+=($!)
  eval "PID_$id=$!"
  local deadline=$((SECONDS + 30))
  until grep -q "ready" "$work/$id.out" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "${pids[-1]}" 2>/dev/null; then
      echo "demo: node $id did not start:"; cat "$work/$id.log"; exit 1
    fi
    sleep 0.1
  done
  eval "PORT_$id=$(grep -o 'replication=127.0.0.1:[0-9]*' "$work/$id.out" | cut -d: -f2)"
  eval "CLIENT_$id=$(grep -o 'client=127.0.0.1:[0-9]*' "$work/$id.out" | cut -d: -f2)"
}
cli() { local port=$1; shift; redis-cli -h 127.0.0.1 -p "$port" "$@"; }
client() { eval "echo \$CLIENT_$1"; }
role() { cli "$(client "$1")" ROLE 2>/dev/null | head -1; }
lsn() {  # last LSN on the active, applied LSN on a standby; "down" if it does not answer
  local info
  info=$(cli "$(client "$1")" INFO replication 2>/dev/null | tr -d '\r') || { echo down; return; }
  [ -n "$info" ] || { echo down; return; }
  if echo "$info" | grep -q role:master; then echo "$info" | field master_repl_offset; else echo "$info" | field slave_repl_offset; fi
}
# find_active [deadline seconds]: prints the id of the node answering ROLE with master
find_active() {
  local deadline=$((SECONDS + ${1:-30})) id
  while [ $SECONDS -lt $deadline ]; do
    for id in a b c; do
      [ "$(role "$id")" = master ] && { echo "$id"; return; }
    done
    sleep 0.05
  done
  echo none
}

echo "== Part 1: the write-ahead log alone: SIGKILL, torn write, recovery"
wal="$work/wal"
"$B/walgen" "$wal" --records 100000000 --threads 8 --print-acks --segment-size 1048576 --log-level warn \
  > "$work/acks" &
gen=$!
pids+=($gen)
deadline=$((SECONDS + 60))
while [ "$(grep -c '^ack' "$work/acks" || true)" -lt 20000 ]; do
  kill -0 "$gen" 2>/dev/null || { echo "demo: the writer died early"; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "demo: the writer made no progress in 60 s"; exit 1; }
  sleep 0.2
done
kill -9 "$gen"; wait "$gen" 2>/dev/null || true
pids=()
acked=$(grep '^ack' "$work/acks" | cut -d' ' -f2 | sort -n | tail -1)
nacks=$(grep -c '^ack' "$work/acks")
echo "   8 writers SIGKILLed after $nacks acknowledged appends (highest LSN $acked)"
# Where the log ends in its last segment: the summary's log_bytes less the
# older segments (each ends at its last frame; the last one has space
# reserved after it, which reads as zeros).
last_seg=$(ls "$wal"/*.wal | tail -1)
log_bytes=$("$B/waldump" --json --summary "$wal" | grep -o '"log_bytes":[0-9]*' | cut -d: -f2)
older=0
for f in "$wal"/*.wal; do [ "$f" = "$last_seg" ] || older=$((older + $(stat -c %s "$f"))); done
head -c 57 /dev/urandom | dd of="$last_seg" bs=1 seek=$((log_bytes - older)) conv=notrunc status=none
echo "   57 bytes of a half-written frame written after the last record (a torn write, as a power cut leaves)"
"$B/walgen" "$wal" --records 1000 --log-level warn > "$work/recover.out" 2>&1
grep -o 'a torn tail was cut' "$work/recover.out" | sed 's/^/   recovery: /'
summary=$("$B/waldump" --json --summary "$wal")
last=$(echo "$summary" | grep -o '"last_lsn":[0-9]*' | cut -d: -f2)
records=$(echo "$summary" | grep -o '"records":[0-9]*' | cut -d: -f2)
wal_ok=yes
[ "$records" = "$last" ] && [ "$last" -ge $((acked + 1000)) ] || wal_ok=no
echo
echo "== Part 2: failover, then proof that the replicas are identical"
echo "== 1. etcd on 127.0.0.1:$etcd_port; three nodes a, b, c with --etcd (commit rule remote-write:1)"
start_node a; start_node b; start_node c
first=$(find_active)
[ "$first" != none ] || { echo "demo: no active was elected"; exit 1; }
echo "   elected: $first is the active; ROLE on each: a=$(role a) b=$(role b) c=$(role c)"
standby=$( [ "$first" = a ] && echo b || echo a )
cli "$(client "$standby")" SET x 1 | head -1 | sed "s/^/   SET on standby $standby: /"

echo "== 2. write load on $first: redis-benchmark, 100-byte SETs from 50 clients; live LSNs"
redis-benchmark -h 127.0.0.1 -p "$(client "$first")" -t set -n 60000 -r 20000 -d 100 -c 50 -q > "$work/bench1.out" 2>&1 &
bench=$!
pids+=($bench)
t0=$(now_ms)
while kill -0 "$bench" 2>/dev/null && [ $(( $(now_ms) - t0 )) -lt 2000 ]; do
  sleep 0.5
  printf '   t=%5d ms  a %-7s  b %-7s  c %-7s\n' "$(( $(now_ms) - t0 ))" "$(lsn a)" "$(lsn b)" "$(lsn c)"
done

echo "== 3. SIGKILL the active ($first) mid-load"
kill_ms=$(now_ms)
eval "kill -9 \$PID_$first"; eval "wait \$PID_$first 2>/dev/null" || true
wait "$bench" 2>/dev/null || true  # it loses its server
new=none
while [ "$new" = none ] && [ $(( $(now_ms) - kill_ms )) -lt 30000 ]; do
  for id in a b c; do
    [ "$id" = "$first" ] && continue
    if [ "$(cli "$(client "$id")" SET failover done 2>/dev/null)" = OK ]; then new=$id; break; fi
  done
done
[ "$new" != none ] || { echo "demo: no standby took over"; cat "$work"/*.log; exit 1; }
failover_ms=$(( $(now_ms) - kill_ms ))
echo "   $new promoted; first write accepted on it ${failover_ms} ms after the SIGKILL (lease TTL 2 s)"
grep -h "engine.promoted" "$work/$new.log" | tail -1 | sed 's/^/   log: /'

echo "== 4. load moves to the new active ($new); the old active ($first) comes back"
redis-benchmark -h 127.0.0.1 -p "$(client "$new")" -t set -n 40000 -r 20000 -d 100 -c 50 -q > "$work/bench2.out" 2>&1 &
bench=$!
pids+=($bench)
sleep 1
start_node "$first"
t0=$SECONDS
while kill -0 "$bench" 2>/dev/null; do
  printf '   t=%ds  a %-7s  b %-7s  c %-7s  (%s: %s)\n' "$((SECONDS - t0))" "$(lsn a)" "$(lsn b)" "$(lsn c)" "$first" "$(role "$first")"
  sleep 1
done
rps=$(tr '\r' '\n' < "$work/bench2.out" | grep -o 'SET: [0-9.]* requests per second' | tail -1 | grep -o '[0-9.]*' | head -1)
echo "   redis-benchmark on $new: ${rps:-?} SET/s with remote-write:1"
{ grep -h "resync_installed\|standby_rewind\|rejoin_truncated" "$work/$first.log" "$work/$new.log" || true; } | tail -2 | sed 's/^/   log: /'

echo "== 5. catch-up, then stop all nodes (SIGTERM) and compare them"
cli "$(client "$new")" SET last write > /dev/null
final=$(lsn "$new")
deadline=$((SECONDS + 60))
for id in a b c; do
  [ "$id" = "$new" ] && continue
  until [ "$(lsn "$id")" = "$final" ]; do
    [ $SECONDS -lt $deadline ] || { echo "demo: $id did not catch up; its log:"; tail -20 "$work/$id.log"; exit 1; }
    sleep 0.2
  done
done
echo "   a, b and c all at LSN $final; roles: a=$(role a) b=$(role b) c=$(role c)"
echo "   repctl status:"
"$B/repctl" --etcd "127.0.0.1:$etcd_port" --cluster demo status | sed 's/^/     /'
echo "   logdiff --live (the nodes running; each hashes its own replica at one LSN):"
"$B/logdiff" --live --no-progress --cluster demo --secret-file "$work/secret" \
  "a=127.0.0.1:$PORT_a" "b=127.0.0.1:$PORT_b" "c=127.0.0.1:$PORT_c" > "$work/live.out" && live_same=yes || live_same=no
sed 's/^/     /' "$work/live.out"
keys=$(cli "$(client "$new")" DBSIZE)
# The standbys first, then the active: a standby still running when the
# active stops would be elected (and write an epoch start the others lack).
for id in a b c; do
  [ "$id" = "$new" ] && continue
  eval "kill -TERM \$PID_$id"; eval "wait \$PID_$id" || true
done
eval "kill -TERM \$PID_$new"; eval "wait \$PID_$new" || true
echo "   logdiff --strict on the data directories (the nodes stopped):"
"$B/logdiff" --strict --no-progress "$work/a" "$work/b" "$work/c" > "$work/logdiff.out" && same=yes || same=no
sed 's/^/     /' "$work/logdiff.out"
epochs=$("$B/waldump" --summary "$work/$new/wal" | grep -c 'epoch .* starts' || true)
echo "   epochs in the log: $epochs"

printf '\n%-52s %s\n' "summary" ""
printf '%-52s %s\n' "active SIGKILLed under load: new active" "$new, first write after ${failover_ms} ms"
printf '%-52s %s\n' "old active back" "$first follows $new"
printf '%-52s %s\n' "writes on the new active (remote-write:1)" "${rps:-?} SET/s (redis-benchmark, 50 clients)"
printf '%-52s %s\n' "keys on each node" "$keys"
printf '%-52s %s\n' "replicas identical, running (logdiff --live)" "$live_same"
printf '%-52s %s\n' "replicas identical, stopped (logdiff --strict)" "$same"
printf '%-52s %s\n' "WAL crash: acknowledged records lost" "$([ $wal_ok = yes ] && echo 0 || echo 'SOME: FAILED')"
if [ "$same" = yes ] && [ "$live_same" = yes ] && [ "$wal_ok" = yes ]; then
  echo "demo: OK"
else
  echo "demo: FAILED"
  exit 1
fi
