#!/usr/bin/env bash
# On a machine with several GPUs (issue 11, "Benchmarks"), in one go: builds
# bench_dist and charlm, runs bench_dist on all the GPUs (NCCL bus bandwidths,
# sequence-parallel dilated attention's weak and strong scaling), then the
# charlm recipe's data-parallel throughput at dp = 1, 2, 4, 8 (as many as there
# are GPUs), and prints one short table. Optionally (--charlm-8m) a short
# char-LM run at context 8,388,608 over all the GPUs (--sp).
#   scripts/bench_multi_gpu.sh [options]
#     --build DIR        build directory (default $MINIDL_BUILD_DIR or build-multi-gpu);
#                        configured here unless it already is
#     --reps N           bench_dist repetitions, medians reported (default 3)
#     --strong-n N       bench_dist's strong-scaling sequence length (default 8388608)
#     --dp-steps N       charlm steps per data-parallel run (default 150; steps 21 on are timed)
#     --dp-global-batch  keep the recipe's global batch 64 at every dp (default:
#                        64 sequences per GPU, --batch 64·dp)
#     --charlm-8m        also train at context 8,388,608 (the 1M run's 2-layer model, --sp = GPUs)
#     --8m-steps N       its steps (default 10; steps 3 on are timed)
# Output (logs, bench_dist.json, summary.txt) goes to $OUT (default out/multi-gpu).
# Dependencies may come from a prefix, as for gpu-check.sh: MINIDL_PREFIX=$PWD/.deps/usr.
# The data: data/tinyshakespeare.txt, fetched by scripts/get-data.sh
# (MINIDL_DATA_DIR: copy it from there). Time limits per step: BENCH_TIMEOUT
# (bench_dist, default 300 s), DP_TIMEOUT (each charlm run, default 120 s),
# CTX8M_TIMEOUT (default 420 s).
set -uo pipefail
source "$(dirname "$0")/common.sh"
minidl_absolute_paths
cd "$(dirname "$0")/.." || exit 1

usage_error() { echo "bench_multi_gpu: $*" >&2; exit 2; }
build=${MINIDL_BUILD_DIR:-build-multi-gpu}
reps=3 strong_n=8388608 dp_steps=150 dp_global=0 ctx8m=0 steps8m=10
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift ;;
    --reps) reps=$2; shift ;;
    --strong-n) strong_n=$2; shift ;;
    --dp-steps) dp_steps=$2; shift ;;
    --dp-global-batch) dp_global=1 ;;
    --charlm-8m) ctx8m=1 ;;
    --8m-steps) steps8m=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage_error "unknown option $1 (see --help)" ;;
  esac
  shift
done
[ "$dp_steps" -ge 40 ] || usage_error "--dp-steps must be at least 40 (steps 21 on are timed)"
[ "$steps8m" -ge 4 ] || usage_error "--8m-steps must be at least 4 (steps 3 on are timed)"

dest=${OUT:-out/multi-gpu}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PATH=/usr/local/cuda/bin:$PATH
prefix=${MINIDL_PREFIX:-}
[ -n "$prefix" ] && export LD_LIBRARY_PATH=$prefix/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
T0=$(date +%s)
stamp() { echo "[bench_multi_gpu] $* ($(($(date +%s) - T0)) s)"; }

# ---- Build ----
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" ${prefix:+-DCMAKE_PREFIX_PATH=$prefix} -DCMAKE_BUILD_TYPE=Release \
    -DMINIDL_BUILD_TESTS=OFF -DMINIDL_BUILD_BENCH=ON -DMINIDL_BUILD_EXAMPLES=ON >"$dest/cmake.log" 2>&1 ||
    { tail -20 "$dest/cmake.log"; exit 1; }
fi
cmake --build "$build" -j"$(nproc)" --target bench_dist charlm >"$dest/build.log" 2>&1 ||
  { grep -E "error|bench_dist" "$dest/build.log" | head -20
    echo "bench_multi_gpu: build failed (bench_dist needs CUDA and NCCL: see 'NCCL backend' in $dest/cmake.log" \
         "or the build's configure output; NCCL_HOME may point at an NCCL install)" >&2; exit 1; }
stamp "built in $build"
bench=$build/bench/bench_dist
charlm=$build/examples/charlm/charlm
gpus=$("$charlm" info | sed -n 's/^cuda: available (\([0-9]*\) device.*/\1/p')
gpus=${gpus:-0}
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "GPUs: $gpus x ${gpu_name:-?}" | tee "$dest/gpus.txt"

# ---- bench_dist ----
timeout -k 30 "${BENCH_TIMEOUT:-300}" "$bench" --strong_n="$strong_n" --benchmark_repetitions="$reps" \
  --benchmark_report_aggregates_only=true --benchmark_out="$dest/bench_dist.json" --benchmark_out_format=json \
  >"$dest/bench_dist.txt" 2>&1
stamp "bench_dist: rc=$? (log: $dest/bench_dist.txt)"

# ---- charlm data parallel ----
# Training tokens/s of a run from its log.csv (DIR TOKENS_PER_STEP FROM):
# tokens over seconds of the steps after FROM (leaving out the first steps'
# setup: plans, NCCL, on one rank the CUDA graph's capture), each row's rate
# covering the steps since the row before.
log_tok_s() {
  awk -F, -v tokens_per_step="$2" -v from="$3" 'NR > 1 && $5 > 0 && prev >= from {
      n = ($1 - prev) * tokens_per_step; tok += n; sec += n / $5 }
    NR > 1 { prev = $1 } END { if (sec > 0) printf "%.0f", tok / sec }' "$1/log.csv"
}
# Scaling efficiency of $tok at dp $n against the dp 1 rate $1 (empty: none).
eff() {
  [ -n "$1" ] && awk -v t="$tok" -v b="$1" -v n="$n" 'BEGIN { printf "%.1f%%", 100 * t / (b * n) }'
}
join_commas() { local IFS=,; echo "$*"; }
dp_table=()
if [ "$gpus" -ge 1 ] && scripts/get-data.sh data >"$dest/data.log" 2>&1; then
  dp_tok_1=""
  # Every rank replays its step as a CUDA graph; "Ne" is the largest dp
  # again with --no-graph (every rank eager), to show what the graphs buy.
  # Should a several-GPU graph run time out (NCCL warns that captures with
  # several GPUs in one process may deadlock), the later runs go eager.
  runs=(1 2 4 8)
  top=$((gpus >= 8 ? 8 : gpus >= 4 ? 4 : gpus >= 2 ? 2 : 0))
  [ "$top" -gt 0 ] && runs+=("${top}e")
  graphs_hung=""
  for dp in "${runs[@]}"; do
    n=${dp%e}
    [ "$n" -le "$gpus" ] || continue
    # The eager row is a repeat once the graph runs before it went eager.
    [ -n "$graphs_hung" ] && [ "$dp" != "$n" ] && [ "$graphs_hung" -lt "$n" ] && continue
    batch=$((dp_global ? 64 : 64 * n))
    extra=()
    [ "$dp" != "$n" ] || [ -n "$graphs_hung" ] && extra=(--no-graph)
    run=$work/dp$dp
    # The recipe is charlm's default (nanoGPT's shakespeare_char) in bf16; one
    # evaluation batch at the start and end.
    timeout -k 30 "${DP_TIMEOUT:-120}" "$charlm" train --data data/tinyshakespeare.txt --out "$run" --device cuda \
      --dtype bfloat16 --batch "$batch" --dp "$n" --iters "$dp_steps" --warmup $((dp_steps < 100 ? dp_steps : 100)) \
      --eval-interval "$dp_steps" --eval-iters 1 --log-interval 10 "${extra[@]}" >"$dest/charlm-dp$dp.log" 2>&1
    rc=$?
    if [ "$n" -gt 1 ] && [ ${#extra[@]} -eq 0 ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; }; then
      graphs_hung=$n
      stamp "charlm --dp $n with CUDA graphs timed out: the larger dp run eagerly (--no-graph)"
    fi
    [ -f "$run/log.csv" ] && cp "$run/log.csv" "$dest/charlm-dp$dp.csv"
    tok=$([ $rc -eq 0 ] && log_tok_s "$run" $((batch * 256)) 20)
    stamp "charlm --dp $n${extra[*]:+ ${extra[*]}} --batch $batch: rc=$rc, ${tok:-?} tok/s"
    label=$n${extra[*]:+ eager}
    if [ -z "$tok" ]; then dp_table+=("$(printf '%-8s %8s %14s' "$label" "$batch" "failed (rc $rc)")"); continue; fi
    [ "$dp" = 1 ] && dp_tok_1=$tok
    dp_table+=("$(printf '%-8s %8s %14s %9s' "$label" "$batch" "$tok" "$(eff "$dp_tok_1")")")
  done
else
  dp_table+=("skipped: no GPU, or no data (see $dest/data.log; MINIDL_DATA_DIR)")
fi

# ---- charlm at context 8,388,608 (opt-in) ----
ctx_line=""
if [ "$ctx8m" = 1 ]; then
  ctx=8388608
  if [ "$gpus" -lt 1 ] || [ $((ctx % gpus)) -ne 0 ] || [ ! -s data/tinyshakespeare.txt ]; then
    ctx_line="skipped: needs GPUs dividing $ctx and data/tinyshakespeare.txt"
  else
    # The 1M run's model (docs/BENCHMARKS.md, "Long context": 2 layers, 4
    # heads, width 256, rope, batch 1, dropout 0.2) with LongNet's branches
    # extended until a segment covers the context (w = 2048·2^i, r = 2^i: 13
    # branches), so the long segments gather across the ranks. The 90/10 split needs a
    # context + 1 characters of validation text: tiny shakespeare 80 times.
    for _ in $(seq 80); do cat data/tinyshakespeare.txt; done >"$work/text80.txt"
    segs=() dils=()
    for ((w = 2048, r = 1; w <= ctx; w *= 2, r *= 2)); do segs+=("$w"); dils+=("$r"); done
    timeout -k 30 "${CTX8M_TIMEOUT:-420}" "$charlm" train --data "$work/text80.txt" --out "$work/ctx8m" --device cuda \
      --dtype bfloat16 --attention dilated --pos rope --context $ctx \
      --segments "$(join_commas "${segs[@]}")" --dilations "$(join_commas "${dils[@]}")" \
      --batch 1 --layers 2 --heads 4 --width 256 --dropout 0.2 --sp "$gpus" \
      --iters "$steps8m" --warmup 0 --eval-interval "$steps8m" --eval-iters 1 --log-interval 1 \
      >"$dest/charlm-ctx8m.log" 2>&1
    rc=$?
    [ -f "$work/ctx8m/log.csv" ] && cp "$work/ctx8m/log.csv" "$dest/charlm-ctx8m.csv"
    tok=$([ $rc -eq 0 ] && log_tok_s "$work/ctx8m" $ctx 2)
    peak=$(grep -o 'peak memory [0-9.]* GiB' "$dest/charlm-ctx8m.log" | tail -1)
    ctx_line="context $ctx, --sp $gpus, $steps8m steps: rc=$rc, ${tok:-?} tok/s (steps 3 on)${peak:+, $peak}"
    stamp "charlm 8M: $ctx_line"
  fi
fi

# ---- The table ----
{
  echo
  commit=$(git rev-parse --short HEAD 2>/dev/null)
  echo "== multi-GPU benchmarks: $gpus x ${gpu_name:-?}, $(date -u +%Y-%m-%d), commit ${commit:-?} =="
  sed -n '/^== bench_dist summary/,$p' "$dest/bench_dist.txt" | sed 1d
  if ! grep -q "^== bench_dist summary" "$dest/bench_dist.txt"; then
    echo "bench_dist: no summary; its last lines:"
    tail -5 "$dest/bench_dist.txt"
  fi
  echo "charlm data parallel (recipe, bf16, $([ "$dp_global" = 1 ] && echo "global batch 64" ||
    echo "64 sequences per GPU"), $dp_steps steps): efficiency = tok/s(dp) / (dp · tok/s(dp 1))"
  printf '%-8s %8s %14s %9s\n' dp batch "tok/s" "vs dp 1"
  printf '%s\n' "${dp_table[@]}"
  [ -n "${graphs_hung:-}" ] && echo "(--dp $graphs_hung with CUDA graphs timed out; the larger dp ran eagerly)"
  if [ -n "$ctx_line" ]; then echo "charlm long context: $ctx_line"; fi
} | tee "$dest/summary.txt"
