#!/usr/bin/env bash
# Installs missing packages, builds minidl and runs every test through ctest.
# CUDA test cases run when a GPU is present and skip with a message otherwise;
# after ctest, a line says how many were skipped (ctest counts them as passed).
#   scripts/test.sh            (build dir: build, or $MINIDL_BUILD_DIR)
set -euo pipefail
source "$(dirname "$0")/common.sh"
minidl_absolute_paths
cd "$(dirname "$0")/.."
minidl_install_deps
dir=${MINIDL_BUILD_DIR:-build}
minidl_build "$dir" -DMINIDL_BUILD_TESTS=ON  # a folder configured without tests would run none
rc=0
ctest --test-dir "$dir" --output-on-failure --no-tests=error -j"$(minidl_jobs)" || rc=$?

# Each skipped case prints "FILE:LINE: MESSAGE: skipped: no CUDA device"
# (MINIDL_REQUIRE_CUDA); ctest keeps every test's output in LastTest.log.
# A case counts once per test program that ran it.
log=$dir/Testing/Temporary/LastTest.log
if [ -f "$log" ]; then
  counts=$(awk '
    /^[0-9]+\/[0-9]+ Test: / { test = $3 }
    /: MESSAGE: skipped: no CUDA device/ { if (!((test, $1) in seen)) { seen[test, $1] = 1; n[test]++ } }
    END { for (t in n) print t, n[t] }' "$log" | sort)
  total=$(awk '{ s += $2 } END { print s + 0 }' <<<"$counts")
  if [ "$total" -eq 0 ]; then
    echo "CUDA test cases skipped for lack of a GPU: none"
  else
    echo "CUDA test cases skipped for lack of a GPU: $total (ctest counts them as passed):" \
      "$(awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2 }' <<<"$counts")"
  fi
fi
exit $rc
