#!/usr/bin/env bash
# On a GPU machine: builds minidl (sm_90), runs the whole test suite, the
# CUDA kernel tests under compute-sanitizer (memcheck, racecheck), the CUDA
# benchmarks, the charlm training step's profile (bf16 and float32 recipes)
# and the PyTorch anchors; logs go to a work folder, packed into
# $OUT/gpu-logs.tar.gz with a summary in $OUT/summary.txt (the benchmarks'
# with the SM clock and power they ran at).
#   scripts/gpu-check.sh [tests] [sanitize] [bench] [step] [torch]   (default: all)
# Environment:
#   OUT                    output folder, relative to the repository root
#                          (default gpu-out); bench also draws bench_attention.png there
#   MINIDL_BUILD_DIR       build folder, configured and built on every run
#                          (default /tmp/minidl-gpu)
#   MINIDL_BENCHES         the bench programs that bench runs; one not built is skipped
#                          (default: bench_attention bench_matmul bench_softmax bench_elementwise)
#   MINIDL_FILTER_<bench>  that program's --benchmark_filter regex (default: all),
#                          e.g. MINIDL_FILTER_bench_attention=dense
#   MINIDL_PREFIX          dependencies unpacked under a prefix, e.g. $PWD/.deps/usr
#                          (cmake's CMAKE_PREFIX_PATH and LD_LIBRARY_PATH; scripts/common.sh)
#   MINIDL_DATA_DIR        a folder holding tinyshakespeare.txt, for step offline;
#                          otherwise scripts/get-data.sh downloads it into data/
set -uo pipefail
source "$(dirname "$0")/common.sh"
minidl_absolute_paths
cd "$(dirname "$0")/.."
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
# Checked before anything runs: a mistyped step would otherwise build and run nothing of it.
for a in "$@"; do
  case $a in
    -h | --help) usage; exit 0 ;;
    tests | sanitize | bench | step | torch) ;;
    *) printf '%s\n' "gpu-check: unknown step '$a'" \
         "usage: scripts/gpu-check.sh [tests] [sanitize] [bench] [step] [torch]   (default: all; --help: more)" >&2
       exit 2 ;;
  esac
done
dest=${OUT:-gpu-out}
out=$(mktemp -d)
mkdir -p "$dest"
steps=${*:-tests sanitize bench step torch}
minidl_use_prefix
build=${MINIDL_BUILD_DIR:-/tmp/minidl-gpu}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
cmake -S . -B "$build" "${MINIDL_CMAKE_PREFIX[@]}" -DCMAKE_BUILD_TYPE=Release >"$out/cmake.log" 2>&1 ||
  { tail -20 "$out/cmake.log"; exit 1; }
cmake --build "$build" -j"$(nproc)" >"$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head -20; exit 1; }
export OMP_WAIT_POLICY=PASSIVE
summary=()
if [[ $steps == *tests* ]]; then
  ctest --test-dir "$build" -j4 --timeout 300 --output-on-failure >"$out/ctest.log" 2>&1
  summary+=("ctest: $(grep -E 'tests passed' "$out/ctest.log")")
  grep -E "Failed|\*\*\*" "$out/ctest.log" | head -20
fi
if [[ $steps == *sanitize* ]]; then
  # memcheck: every test program, whole (the attention tests run every kernel
  # version themselves, through MINIDL_ATTENTION_KERNEL). API errors are not
  # counted: the code checks every CUDA call's result itself (a failed one
  # fails its test), and test_core runs the device out of memory on purpose.
  for t in "$build"/tests/test_*; do
    [ -x "$t" ] || continue
    n=$(basename "$t")
    timeout 300 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 "$t" \
      >"$out/memcheck-$n.log" 2>&1
    summary+=("memcheck $n: rc=$? $(grep -E 'ERROR SUMMARY' "$out/memcheck-$n.log" | tail -1)")
  done
  # racecheck: each CUDA test case of the programs with hand-written kernels
  # in its own process (a whole program can run past the timeout), four at a
  # time. A job line is
  # "ENV|PROGRAM|CASE"; doctest splits -tc at commas, so they become '?'.
  racecheck_one() {
    local env=$1 t=$2 tc=$3 log
    log="$out/racecheck-$(basename "$t")-$(echo "$tc" | tr -c 'A-Za-z0-9' '_' | cut -c1-60).log"
    env OMP_NUM_THREADS=2 ${env:+$env} timeout 420 compute-sanitizer --tool racecheck --error-exitcode 9 \
      "$t" -tc="$tc" >"$log" 2>&1
    echo "rc=$?" >>"$log"
  }
  export -f racecheck_one
  export out
  for n in test_dilated_attention test_nn_functional test_reduce test_indexing test_elementwise test_dropout test_rope test_optim; do
    t="$build/tests/$n"
    [ -x "$t" ] || continue
    "$t" -ltc -tc="*CUDA*,*cuda*" | grep -vE '^\[(doctest|minidl)\]|^=+$' | sed 's/^ *//; s/,/?/g' | grep -v '^$' |
      while IFS= read -r tc; do
        echo "|$t|$tc"
      done
  done | while IFS='|' read -r env t tc; do printf '%s\0%s\0%s\0' "$env" "$t" "$tc"; done |
    xargs -0 -n 3 -P 4 bash -c 'racecheck_one "$0" "$1" "$2"'
  for f in "$out"/racecheck-*.log; do
    [ -e "$f" ] || continue
    summary+=("$(basename "$f" .log): $(tail -1 "$f") $(grep -E 'RACECHECK SUMMARY' "$f" | tail -1 || echo 'no summary (timed out?)')")
  done
fi
if [[ $steps == *bench* ]]; then
  for b in ${MINIDL_BENCHES:-bench_attention bench_matmul bench_softmax bench_elementwise}; do
    [ -x "$build/bench/$b" ] || continue
    filter_var=MINIDL_FILTER_$b
    extra=()
    # bench_attention as docs/BENCHMARKS.md's tables: medians of 3 runs of at least 0.2 s
    [ "$b" = bench_attention ] && extra=(--plot="$dest/bench_attention.png" --benchmark_min_time=0.2
                                         --benchmark_repetitions=3)
    minidl_clocks_start "$out/$b.smi.csv"
    "$build/bench/$b" --benchmark_filter="${!filter_var:-.}" --benchmark_out="$out/$b.json" \
      --benchmark_out_format=json "${extra[@]}" >"$out/$b.txt" 2>&1
    summary+=("$b $(minidl_clocks_stop)")
  done
  summary+=("bench: see $out/bench_*.txt")
fi
if [[ $steps == *step* ]]; then
  # The recipe's step, timed per phase, its launches counted (charlm --profile).
  if scripts/get-data.sh data >"$out/get-data.log" 2>&1; then
    for dtype in bfloat16 float32; do
      "$build/examples/charlm/charlm" train --data data/tinyshakespeare.txt --dtype "$dtype" --profile 30 \
        >"$out/step-$dtype.txt" 2>&1
      summary+=("step $dtype: $(grep -E '^graph:|^launches per step' "$out/step-$dtype.txt" | cut -d';' -f1 | tr '\n' ' ')")
    done
  else
    summary+=("step: skipped, no data ($(tail -1 "$out/get-data.log"))")
  fi
fi
if [[ $steps == *torch* ]] && python3 -c "import torch" 2>/dev/null; then
  minidl_clocks_start "$out/pytorch.smi.csv"
  python3 bench/pytorch/attention_baseline.py >"$out/pytorch.txt" 2>&1
  summary+=("pytorch: $(tr '\n' ';' <"$out/pytorch.txt")" "pytorch attention $(minidl_clocks_stop)")
  python3 bench/pytorch/charlm_baseline.py >"$out/pytorch-charlm.txt" 2>&1
  summary+=("pytorch charlm: $(grep -E 'tok/s' "$out/pytorch-charlm.txt" | tr '\n' ';')")
fi
printf '%s\n' "${summary[@]}" | tee "$dest/summary.txt"
tar -czf "$dest/gpu-logs.tar.gz" -C "$out" .
