#!/usr/bin/env bash
# The test command: installs what is missing, then builds and runs the whole
# test suite twice: a normal optimised build, and an AddressSanitizer +
# UndefinedBehaviorSanitizer build (clang, with -Wthread-safety).
#
#   tools/test.sh            both builds
#   tools/test.sh --quick    the normal build only
#   REPLICA_SOAK=1 tools/test.sh   also the long crash/stress rounds
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
jobs=$(nproc)

bash tools/setup.sh
echo "== tests: normal build =="
ctest --test-dir build --output-on-failure -j "$jobs" --timeout 600

if [ "$quick" -eq 0 ]; then
  bash tools/setup.sh --sanitize
  echo "== tests: ASan + UBSan build =="
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j "$jobs" --timeout 900
fi
