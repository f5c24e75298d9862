#!/usr/bin/env bash
# Builds minidl's CPU backend under a sanitizer and runs every test through
# ctest (CUDA cases skip: compute-sanitizer covers the device side).
#   scripts/sanitize.sh address   AddressSanitizer + UndefinedBehaviorSanitizer (leaks, float-to-int overflow and
#                                 libstdc++'s index assertions too)
#   scripts/sanitize.sh thread    ThreadSanitizer (the in-process ranks, DataParallel's hooks, OpenMP off)
# Build dir: build-<sanitizer> ($MINIDL_BUILD_DIR-<sanitizer> when that is set). Any report fails its test.
set -euo pipefail
source "$(dirname "$0")/common.sh"
minidl_absolute_paths
cd "$(dirname "$0")/.."
kind=${1:-}
case "$kind" in
  address) export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ;;
  # OpenMP's own barriers are invisible to TSan (libgomp is not built with
  # it): one OpenMP thread, so that only minidl's threads run concurrently.
  thread) export OMP_NUM_THREADS=1 TSAN_OPTIONS=second_deadlock_stack=1 ;;
  *) echo "usage: scripts/sanitize.sh address|thread" >&2; exit 2 ;;
esac
minidl_install_deps
dir=${MINIDL_BUILD_DIR:-build}-$kind
# The benchmarks time things; they add nothing here.
minidl_build "$dir" -DMINIDL_CUDA=OFF -DMINIDL_SANITIZE="$kind" -DMINIDL_BUILD_TESTS=ON -DMINIDL_BUILD_BENCH=OFF
ctest --test-dir "$dir" --output-on-failure --no-tests=error -j"$(minidl_jobs)"
