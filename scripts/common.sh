# Shared by the scripts: installs what minidl needs on Debian/Ubuntu and puts
# nvcc on PATH when the CUDA toolkit is present.
# shellcheck shell=bash

MINIDL_PACKAGES=(cmake g++ make doctest-dev libstb-dev libbenchmark-dev)

minidl_install_deps() {
  local missing=()
  for p in "${MINIDL_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[minidl] installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi
}

minidl_jobs() { nproc 2>/dev/null || echo 2; }

# Configures and builds into $1 (default: build).
minidl_build() {
  local dir=${1:-build}
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release
  cmake --build "$dir" -j"$(minidl_jobs)"
}
