#!/usr/bin/env bash
# Failover time, measured end to end: a local etcd and three replicad nodes
# with --etcd; each round SIGKILLs the active and times how long until a
# write is accepted by the new active (polled with redis-cli on the other
# nodes), then brings the killed node back and waits until it has caught
# up. Prints every round, then the median and the maximum. A last round
# times a planned switchover (repctl) the same way.
#
#   bench/failover.sh [--rounds N] [--lease-ttl S] [--build DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=20
ttl=2
build=build
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift ;;
    --lease-ttl) ttl=$2; shift ;;
    --build) build=$2; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "failover.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
B=$build/tools
[ -x "$B/replicad" ] && [ -x "$B/repctl" ] || { echo "failover.sh: build first (bash tools/setup.sh)" >&2; exit 2; }
work=$(mktemp -d /tmp/replica-failover.XXXXXX)
declare -A PID CLIENT
etcd_pid=""
cleanup() {
  for p in "${PID[@]}" $etcd_pid; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PID[@]}" $etcd_pid; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
echo secret > "$work/secret"; chmod 600 "$work/secret"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
. tools/ports.sh
etcd_port=$(free_port); peer=$(free_port)
etcd --name fb --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "fb=http://127.0.0.1:$peer" \
  --log-level error > "$work/etcd.log" 2>&1 &
etcd_pid=$!
until curl -sf "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q true; do sleep 0.1; done

start_node() {
  local id=$1
  rm -f "$work/$id.out"  # a restarted node's ready line must not be taken for its predecessor's
  "$B/replicad" --id "$id" --data-dir "$work/$id" --listen 127.0.0.1:0 --client-listen 127.0.0.1:0 \
    --secret-file "$work/secret" --etcd "127.0.0.1:$etcd_port" --cluster fb --lease-ttl "$ttl" \
    --commit remote-write:1 --log-level warn > "$work/$id.out" 2>> "$work/$id.log" &
  PID[$id]=$!
  until grep -q ready "$work/$id.out" 2>/dev/null; do sleep 0.05; done
  CLIENT[$id]=$(grep -o 'client=127.0.0.1:[0-9]*' "$work/$id.out" | cut -d: -f2)
}
role() { redis-cli -p "${CLIENT[$1]}" ROLE 2>/dev/null | head -1; }
active() {
  local id
  while :; do
    for id in a b c; do [ "$(role "$id")" = master ] && { echo "$id"; return; }; done
    sleep 0.02
  done
}
offset() { redis-cli -p "${CLIENT[$1]}" INFO replication 2>/dev/null | tr -d '\r' | grep -o "$2:[0-9]*" | cut -d: -f2 || true; }
caught_up() {  # every standby applied what the active holds
  local act=$1 want="" id
  redis-cli -p "${CLIENT[$act]}" SET sync x > /dev/null || true
  until [ -n "$want" ]; do want=$(offset "$act" master_repl_offset); done
  for id in a b c; do
    [ "$id" = "$act" ] && continue
    until [ "$(offset "$id" slave_repl_offset)" = "$want" ]; do sleep 0.02; done
  done
  # and both are listed as eligible for promotion (the sync set)
  until "$B/repctl" --etcd "127.0.0.1:$etcd_port" --cluster fb status --json 2>/dev/null |
      grep -q '"sync_set":\["[abc]","[abc]"\]'; do sleep 0.02; done
}
for id in a b c; do start_node "$id"; done

times=()
for r in $(seq 1 "$rounds"); do
  act=$(active)
  caught_up "$act"
  # A random pause (0-999 ms) first: etcd looks for expired leases every
  # 500 ms, and rounds of a fixed length would all kill at the same phase
  # of that loop, measuring one point of the distribution 20 times.
  sleep "$(printf '0.%03d' $((RANDOM % 1000)))"
  t0=$(now_ms)
  kill -9 "${PID[$act]}"; wait "${PID[$act]}" 2>/dev/null || true
  new=""
  while [ -z "$new" ]; do
    for id in a b c; do
      [ "$id" = "$act" ] && continue
      [ "$(redis-cli -p "${CLIENT[$id]}" SET k "$r" 2>/dev/null)" = OK ] && { new=$id; break; }
    done
  done
  ms=$(( $(now_ms) - t0 ))
  times+=("$ms")
  printf 'round %2d: active %s SIGKILLed, %s accepted a write after %5d ms\n' "$r" "$act" "$new" "$ms"
  start_node "$act"
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
n=${#times[@]}
median=$(echo "$sorted" | awk -v n="$n" 'NR == int((n + 1) / 2) { m = $1 } NR == int(n / 2) + 1 { m2 = $1 } END { print (n % 2) ? m : int((m + m2) / 2) }')
max=$(echo "$sorted" | tail -1)
echo "failover over $n kills (lease TTL ${ttl} s): median ${median} ms, max ${max} ms (goal: <= $((ttl * 1000 + 500)) ms)"

act=$(active)
caught_up "$act"
out=$("$B/repctl" --etcd "127.0.0.1:$etcd_port" --cluster fb switchover)
echo "switchover: $out"
