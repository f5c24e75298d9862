#!/usr/bin/env bash
# A/B timing of a kernel change: builds a base source tree and this one side
# by side (in parallel, Release), then runs one benchmark program of each
# alternately, round after round, and prints one table of medians (a column
# per binary and round), then each run's SM clock and power (sampled by
# nvidia-smi: sustained runs sit at the power cap). Alternating in one call
# keeps clock and thermal drift out of the comparison (docs/kernel-notes.md:
# cross-call noise is 1-2%, the size of most single steps).
#   scripts/ab-bench.sh BASE_DIR [--bench NAME] [--filter REGEX] [--rounds N]
#                       [--env VAR=VALUE ...] [--energy SECONDS]
#                       [--run-limit SECONDS]
#                       [-- extra benchmark flags]
#   scripts/ab-bench.sh --binaries BASE_BIN NEW_BIN [the same options]
# BASE_DIR: the base sources, e.g. `git worktree add ../base HEAD~1` (on a
# machine without the repository, a copy carried there). --env runs this
# tree's binary once more per round with VAR=VALUE set (an experiment's
# switch), as its own column. Defaults: bench_attention, every benchmark,
# 2 rounds, medians of 3 runs of at least 0.2 s. --energy then runs each
# benchmark of the table alone for SECONDS per binary and prints its joules
# per call (mean power x time): at the power cap time follows energy, and
# a change that saves cycles but not joules gains little there
# (docs/kernel-notes.md, session 37). --filter matches the full
# names, which end in /real_time (bench_attention's UseRealTime): a regex
# ending in $ after the size matches nothing. Build folders: /tmp/ab-base,
# /tmp/ab-new ($MINIDL_AB_DIR overrides /tmp/ab); dependencies from a prefix as
# in gpu-check.sh: MINIDL_PREFIX=$PWD/.deps/usr. --binaries skips the builds
# and times two benchmark programs built elsewhere (e.g. on a machine without
# a GPU, carried to one that has it). --run-limit stops any one run of a
# binary after SECONDS: a kernel that hangs then costs one run, not the
# call, and the table still prints, with '-' in that column and a line
# saying which run stopped (default: no limit).
set -uo pipefail
# usage [STATUS]: -h/--help asks for it (0); a usage error prints it on stderr (2).
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[ $# -ge 1 ] || usage >&2
case $1 in -h | --help) usage 0 ;; esac
base= bin_base= bin_new=
if [ "$1" = --binaries ]; then
  [ $# -ge 3 ] || usage >&2
  for b in "$2" "$3"; do [ -x "$b" ] || { echo "ab-bench: $b is not an executable" >&2; exit 2; }; done
  bin_base=$(realpath "$2") bin_new=$(realpath "$3")
  shift 3
else
  base=$(cd "$1" 2>/dev/null && pwd) || { echo "ab-bench: no directory $1" >&2; exit 2; }
  shift
fi
cd "$(dirname "$0")/.."  # after the paths above are made absolute from the caller's directory
bench=bench_attention filter=. rounds=2 envs=() extra=() energy= limit=
while [ $# -gt 0 ]; do
  case $1 in
    --bench) bench=$2; shift 2 ;;
    --filter) filter=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --energy) energy=$2; shift 2 ;;
    --run-limit) limit=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "ab-bench: unknown argument $1" >&2; usage >&2 ;;
  esac
done
[ -n "$base" ] || [ "$bench" = bench_attention ] ||
  { echo "ab-bench: --bench names a program to build; --binaries times the two it is given" >&2; exit 2; }
[ -z "$base" ] || [ -f "$base/CMakeLists.txt" ] || { echo "ab-bench: $base holds no CMakeLists.txt" >&2; exit 2; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "ab-bench: --rounds takes a positive integer, not '$rounds'" >&2; exit 2; }
[ -z "$energy" ] || [[ "$energy" =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
  { echo "ab-bench: --energy takes seconds, not '$energy'" >&2; exit 2; }
[ -z "$limit" ] || [[ "$limit" =~ ^[1-9][0-9]*$ ]] ||
  { echo "ab-bench: --run-limit takes whole seconds, not '$limit'" >&2; exit 2; }
source scripts/common.sh
minidl_use_prefix
root=${MINIDL_AB_DIR:-/tmp/ab}
jobs=$(( ($(nproc) + 1) / 2 ))
build() {  # source dir, build dir
  cmake -S "$1" -B "$2" "${MINIDL_CMAKE_PREFIX[@]}" -DCMAKE_BUILD_TYPE=Release >"$2.cmake.log" 2>&1 &&
    cmake --build "$2" -j"$jobs" --target "$bench" >"$2.build.log" 2>&1
}
mkdir -p "$root"
if [ -n "$base" ]; then
  start=$(date +%s)
  build "$base" "$root-base" & pid_base=$!
  build . "$root-new" & pid_new=$!
  ok=1
  wait $pid_base || { echo "ab-bench: the base build failed ($root-base.build.log):"; grep -m5 error "$root-base.build.log"; ok=0; }
  wait $pid_new || { echo "ab-bench: this tree's build failed ($root-new.build.log):"; grep -m5 error "$root-new.build.log"; ok=0; }
  [ $ok = 1 ] || exit 1
  echo "ab-bench: built both in $(( $(date +%s) - start )) s"
  bin_base=$root-base/bench/$bench bin_new=$root-new/bench/$bench
fi
flags=(--benchmark_filter="$filter" --benchmark_min_time=0.2 --benchmark_repetitions=3
       --benchmark_report_aggregates_only=true "${extra[@]}")
logs=() stopped=()
limited() {  # label, command...: runs it under --run-limit; notes where it stopped or failed
  local label=$1 rc=0
  shift
  if [ -n "$limit" ]; then timeout --kill-after=10 "$limit" "$@" || rc=$?; else "$@" || rc=$?; fi
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    stopped+=("$label: stopped at the run limit of $limit s (a hang?)")
  elif [ $rc != 0 ]; then
    stopped+=("$label: exited with status $rc")
  fi
  return $rc
}
timed() {  # column name, command...: one run, its log and its clocks' summary
  local log=$root/$1.txt
  minidl_clocks_start "${log%.txt}.smi.csv"
  limited "$@" "${flags[@]}" >"$log" 2>&1
  minidl_clocks_stop >"${log%.txt}.clocks"
  logs+=("$log")
}
for ((r = 1; r <= rounds; ++r)); do
  timed "base.r$r" "$bin_base"
  timed "new.r$r" "$bin_new"
  for e in "${envs[@]}"; do
    timed "${e%%=*}=${e#*=}.r$r" env "$e" "$bin_new"
  done
done
# One row per benchmark, one column per run: its median real time.
awk '
  FNR == 1 { col = FILENAME; sub(/.*\//, "", col); sub(/\.txt$/, "", col); cols[++ncol] = col }
  { gsub(/\033\[[0-9;]*m/, "") }
  $1 ~ /_median$/ { name = $1; sub(/(\/real_time)?_median$/, "", name)
                   if (!(name in seen)) { seen[name] = 1; rows[++nrow] = name }
                   t[name, col] = $2 " " $3 }
  END {
    printf "%-40s", "benchmark (median real time)"; for (c = 1; c <= ncol; ++c) printf " %12s", cols[c]; print ""
    for (r = 1; r <= nrow; ++r) {
      printf "%-40s", rows[r]
      for (c = 1; c <= ncol; ++c) printf " %12s", ((rows[r], cols[c]) in t ? t[rows[r], cols[c]] : "-")
      print ""
    }
  }' "${logs[@]}"
report_stops() {  # FROM: the runs that stopped or failed since entry FROM
  local i
  for ((i = $1; i < ${#stopped[@]}; ++i)); do echo "ab-bench: ${stopped[i]}"; done
}
report_stops 0
# Each column's clocks: a change that moves the card's power moves its clock.
for log in "${logs[@]}"; do
  if [ -s "${log%.txt}.clocks" ]; then printf '%-12s %s\n' "$(basename "${log%.txt}")" "$(cat "${log%.txt}.clocks")"; fi
done
# --energy: each benchmark of the table alone, per binary, its clocks summed up
# by minidl_clocks_stop; joules per call = the busy samples' mean power x time.
if [ -n "$energy" ]; then
  names=$(awk '{ gsub(/\033\[[0-9;]*m/, "") } $1 ~ /_median$/ { n = $1; sub(/_median$/, "", n); if (!(n in s)) { s[n] = 1; print n } }' "${logs[0]}")
  printf '%-44s %-12s %10s %10s %8s %10s\n' "benchmark (alone, ${energy} s)" binary "ms" "MHz (med.)" "W" "J/call"
  for name in $names; do
    for col in base new; do
      bin=$bin_base; [ $col = new ] && bin=$bin_new
      log=$root/energy.$col.txt
      minidl_clocks_start "$root/energy.$col.smi.csv"
      n=${#stopped[@]}
      limited "$name alone, $col" "$bin" --benchmark_filter="^${name}\$" --benchmark_min_time="$energy" "${extra[@]}" \
        >"$log" 2>&1
      clocks=$(minidl_clocks_stop)
      ms=$(awk '{ gsub(/\033\[[0-9;]*m/, "") }
                $1 !~ /_(mean|median|stddev|cv)$/ && $3 ~ /^(ns|us|ms|s)$/ {
                  f = $3 == "ns" ? 1e-6 : $3 == "us" ? 1e-3 : $3 == "s" ? 1e3 : 1; printf "%.4g\n", $2 * f; exit }' "$log")
      mhz=$(sed -n 's/.*SM \([0-9]*\) MHz median.*/\1/p' <<<"$clocks")
      watts=$(sed -n 's/.* \([0-9]*\) W mean.*/\1/p' <<<"$clocks")
      if [ -z "$ms" ] || [ -z "$watts" ]; then
        printf '%-44s %-12s %10s  (%s)\n' "$name" "$col" "${ms:--}" "${clocks:-no clocks}"
      else
        awk -v n="$name" -v c="$col" -v ms="$ms" -v mhz="$mhz" -v w="$watts" \
          'BEGIN { printf "%-44s %-12s %10s %10s %8s %10.3f\n", n, c, ms, mhz, w, w * ms / 1000 }'
      fi
      report_stops "$n"
    done
  done
fi
