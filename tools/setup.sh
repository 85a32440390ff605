#!/usr/bin/env bash
# Installs the Debian packages the project needs (only those missing), then
# configures and builds. Safe to run any number of times.
#
#   tools/setup.sh                      deps + normal build in build/
#   tools/setup.sh --sanitize           deps + ASan/UBSan build (clang) in build-asan/
#   tools/setup.sh --deps-only          only the packages
#   tools/setup.sh --build-dir DIR      choose the build directory
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config clang libclang-rt-14-dev
  libboost1.81-dev libboost-program-options1.81-dev libboost-json1.81-dev libprotobuf-dev protobuf-compiler libssl-dev
  liblz4-dev libxxhash-dev librocksdb-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  etcd-server rocksdb-tools redis-tools redis-server openssl
)

sanitize=0
deps_only=0
build_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --deps-only) deps_only=1 ;;
    --build-dir) build_dir="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install packages" >&2; exit 1; }
    SUDO=sudo
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # policy-rc.d keeps the etcd and redis-server packages from starting
  # system-wide services: the tests, the demo and the benchmarks start their
  # own on free loopback ports.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null && $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
[ "$deps_only" -eq 1 ] && exit 0

if [ "$sanitize" -eq 1 ]; then
  build_dir=${build_dir:-build-asan}
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DREPLICA_SANITIZE=ON \
    -DREPLICA_BUILD_BENCH=OFF -DREPLICA_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ >/dev/null
else
  build_dir=${build_dir:-build}
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
ninja -C "$build_dir"
