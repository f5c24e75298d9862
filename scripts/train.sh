#!/usr/bin/env bash
# The main command: trains a character-level language model on tiny
# shakespeare. Installs missing packages, builds charlm, fetches the data and
# trains into runs/shakespeare (or continues the run already there), then says
# where the log, checkpoints and plot are and how to sample.
#   scripts/train.sh [charlm train flags...]     e.g. scripts/train.sh --iters 1000
# Extra flags go to `charlm train` after the defaults, so they override them.
# Environment: MINIDL_BUILD_DIR (default build), MINIDL_RUN_DIR (default
# runs/shakespeare), MINIDL_DATA_DIR (copy the data from there; see get-data.sh).
set -euo pipefail
source "$(dirname "$0")/common.sh"
minidl_absolute_paths
cd "$(dirname "$0")/.."
# The data download needs curl (and certificates), which stock Debian and
# Ubuntu images lack; only when there is something to download.
downloads=()
if [ ! -s data/tinyshakespeare.txt ] && [ -z "${MINIDL_DATA_DIR:-}" ] &&
   ! command -v curl >/dev/null 2>&1 && ! command -v wget >/dev/null 2>&1; then
  downloads=(curl ca-certificates)
fi
minidl_install_deps "${downloads[@]}"

build=${MINIDL_BUILD_DIR:-build}
run=${MINIDL_RUN_DIR:-runs/shakespeare}
data=data/tinyshakespeare.txt

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMINIDL_BUILD_EXAMPLES=ON
cmake --build "$build" -j"$(minidl_jobs)" --target charlm
charlm=$build/examples/charlm/charlm
scripts/get-data.sh "$(dirname "$data")"

# The recipe: nanoGPT's shakespeare_char on a GPU. On a CPU a 2-layer,
# width-64 model (108k parameters): measured on 2 cores, 1500 steps took 45
# seconds, passing validation loss 2.0 near step 750 and ending at 1.84
# (docs/BENCHMARKS.md). That leaves room for busy machines: older, 4.5x slower
# code with the cores 4x oversubscribed took 10.4 minutes for 2000 steps.
if "$charlm" info | grep -q "^cuda: available"; then
  echo "[minidl] GPU found: nanoGPT's shakespeare_char recipe (6 layers, 6 heads, width 384, context 256)"
  recipe=(--device cuda --dtype bfloat16
          --layers 6 --heads 6 --width 384 --context 256 --batch 64 --dropout 0.2
          --lr 1e-3 --min-lr 1e-4 --warmup 100 --iters 5000 --beta1 0.9 --beta2 0.99
          --weight-decay 0.1 --grad-clip 1.0 --eval-interval 250 --eval-iters 200)
else
  if nvidia-smi -L >/dev/null 2>&1; then
    echo "[minidl] warning: a GPU is present but charlm cannot use it (minidl built without CUDA:" \
         "is nvcc installed? see /usr/local/cuda/bin); training on the CPU" >&2
  fi
  echo "[minidl] no GPU: a small CPU recipe (2 layers, 4 heads, width 64, context 64)"
  recipe=(--device cpu
          --layers 2 --heads 4 --width 64 --context 64 --batch 32 --dropout 0
          --lr 3e-3 --min-lr 3e-4 --warmup 50 --iters 1500 --beta1 0.9 --beta2 0.99
          --weight-decay 0.1 --grad-clip 1.0 --eval-interval 250 --eval-iters 20 --log-interval 50)
fi

# OpenMP threads sleep when idle instead of spinning (shared or busy machines).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
status=0
if [ -e "$run/last.ckpt" ]; then
  echo "[minidl] continuing the run in $run (delete that directory to start over)"
  "$charlm" train --resume "$run" "$@" || status=$?
else
  "$charlm" train --data "$data" --out "$run" "${recipe[@]}" "$@" || status=$?
fi

if [ -e "$run/last.ckpt" ]; then
  echo
  echo "[minidl] log:         $run/log.csv"
  echo "[minidl] plot:        $run/loss.png"
  echo "[minidl] checkpoints: $run/best.ckpt (lowest validation loss), $run/last.ckpt (latest; resume"
  echo "                      with scripts/train.sh or $charlm train --resume $run)"
  echo "[minidl] sample:      $charlm sample --ckpt $run/best.ckpt --prompt 'ROMEO:' --tokens 500"
fi
exit $status
