#!/usr/bin/env bash
# Installs missing packages, builds minidl and runs every test through ctest.
# CUDA test cases run when a GPU is present and skip with a message otherwise.
#   scripts/test.sh            (build dir: build, or $MINIDL_BUILD_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
minidl_install_deps
dir=${MINIDL_BUILD_DIR:-build}
minidl_build "$dir"
ctest --test-dir "$dir" --output-on-failure -j"$(minidl_jobs)"
