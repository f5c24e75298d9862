# Shared by the scripts: installs what minidl needs on Debian/Ubuntu and puts
# nvcc on PATH when the CUDA toolkit is present.
# shellcheck shell=bash

MINIDL_PACKAGES=(cmake g++ make doctest-dev libstb-dev libbenchmark-dev)

# The scripts cd to the repository root first: a relative path in one of
# these variables means the caller's directory, so it is made absolute before.
minidl_absolute_paths() {
  local v
  for v in MINIDL_DATA_DIR MINIDL_BUILD_DIR MINIDL_RUN_DIR; do
    if [ -n "${!v:-}" ]; then export "$v=$(realpath -m -- "${!v}")"; fi
  done
}

# Installs what is missing of MINIDL_PACKAGES and of the packages given.
minidl_install_deps() {
  local missing=()
  for p in "${MINIDL_PACKAGES[@]}" "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[minidl] installing: ${missing[*]}"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null 2>&1 ||
        { echo "[minidl] error: not root and no sudo to install ${missing[*]}; install them first" >&2; exit 1; }
      sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi
}

minidl_jobs() { nproc 2>/dev/null || echo 2; }

# Configures and builds into $1 (default: build); further arguments go to
# the configure step (options given there override a folder's cached ones).
minidl_build() {
  local dir=${1:-build}
  shift || true
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@"
  cmake --build "$dir" -j"$(minidl_jobs)"
}

# For the GPU scripts (gpu-check.sh, ab-bench.sh) on a machine where the
# packages are not installed but unpacked under a prefix
# (MINIDL_PREFIX=$PWD/.deps/usr): the libraries on LD_LIBRARY_PATH and
# MINIDL_CMAKE_PREFIX holding the flag that points cmake at them (empty
# without a prefix); nvcc on PATH.
minidl_use_prefix() {
  export PATH=/usr/local/cuda/bin:$PATH
  MINIDL_CMAKE_PREFIX=()
  if [ -n "${MINIDL_PREFIX:-}" ]; then
    export LD_LIBRARY_PATH=$MINIDL_PREFIX/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
    MINIDL_CMAKE_PREFIX=(-DCMAKE_PREFIX_PATH="$MINIDL_PREFIX")
  fi
}

# The GPU's SM clock and power, sampled every 100 ms into $1 from
# minidl_clocks_start until minidl_clocks_stop prints their summary over the
# busy samples (over 300 W). Sustained runs sit at the card's power cap, ~11%
# below the clock of a burst (docs/kernel-notes.md, session 22), so a
# timing's clocks belong beside it. No-ops without nvidia-smi.
minidl_clocks_start() {
  MINIDL_CLOCKS_LOG=$1 MINIDL_CLOCKS_PID=
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_event_reasons.active --format=csv,noheader,nounits \
    -lms 100 >"$MINIDL_CLOCKS_LOG" 2>/dev/null &
  MINIDL_CLOCKS_PID=$!
}
minidl_clocks_stop() {
  [ -n "${MINIDL_CLOCKS_PID:-}" ] || return 0
  kill "$MINIDL_CLOCKS_PID" 2>/dev/null
  wait "$MINIDL_CLOCKS_PID" 2>/dev/null
  # The reasons' bit 2 (its last hex digit) is the SW power cap.
  sort -t, -k1,1n "$MINIDL_CLOCKS_LOG" | awk -F', *' '
    $2 + 0 > 300 { w += $2; if (index("4567cdefCDEF", substr($3, length($3)))) capped++; clk[n++] = $1 }
    END {
      if (n == 0) { print "clocks: no busy samples"; exit }
      printf "clocks: SM %d MHz median (p10 %d, p90 %d) over %d busy samples, %.0f W mean, power cap on %.0f%% of them\n",
             clk[int(n / 2)], clk[int(n / 10)], clk[int(9 * n / 10)], n, w / n, 100 * capped / n
    }'
}
