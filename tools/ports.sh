# ports.sh: sourced by tools/demo.sh, bench/failover.sh and bench/replbench.sh.

# free_port: a port on 127.0.0.1 that nothing listens on right now, below the
# kernel's ephemeral range (32768+), for servers that cannot be given port 0
# (etcd, redis-server). Another process may still take it before the server
# binds: callers that can tell retry.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
}
