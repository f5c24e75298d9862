#!/usr/bin/env bash
# Command-line tests of charlm, one case per ctest test:
#   cli.sh CHARLM CASE SCRATCH_DIR
# Cases: help bad_flags train resume interrupt sample compare. Each trains
# tiny models on a small generated text on one CPU thread (a few seconds).
set -uo pipefail
charlm=$1
case_name=$2
scratch=$3
rm -rf "$scratch" && mkdir -p "$scratch" && cd "$scratch" || exit 1

fail() { echo "FAIL [$case_name]: $*" >&2; exit 1; }

# A few kilobytes of varied, learnable text.
make_text() {
  local i
  for i in $(seq 1 300); do
    echo "the quick brown fox $((i * 7 % 13)) jumps over the lazy dog $((i % 5)), then naps."
  done > text.txt
}

# A one-layer model that trains in well under a second.
# On the CPU everywhere: resume is bit-exact there (CUDA reductions with
# atomics are not), and the GPU paths have their own tests.
TINY=(--data text.txt --device cpu --layers 1 --heads 2 --width 16 --context 16 --batch 4 --eval-iters 2
      --threads 1 --warmup 2 --dropout 0.1)

# The log without the tokens_per_s column (timing differs between runs).
log_without_timing() { cut -d, -f1-4 "$1"; }

# expect_usage_error "substring" ARGS...: exit code 2 and exactly one line
# on stderr that contains the substring.
expect_usage_error() {
  local want=$1
  shift
  "$charlm" "$@" >out.txt 2>err.txt
  local rc=$?
  [ "$rc" -eq 2 ] || fail "charlm $* exited $rc, expected 2 (stderr: $(cat err.txt))"
  [ "$(wc -l <err.txt)" -eq 1 ] || fail "charlm $*: expected a one-line error, got: $(cat err.txt)"
  grep -qF -- "$want" err.txt || fail "charlm $*: error '$(cat err.txt)' does not mention '$want'"
}

case $case_name in
help)
  "$charlm" --help >out.txt || fail "charlm --help exited $?"
  grep -q "^usage: charlm <command>" out.txt || fail "charlm --help printed no usage"
  for cmd in train sample compare; do
    "$charlm" $cmd --help >out.txt || fail "charlm $cmd --help exited $?"
    grep -q "^usage: charlm $cmd" out.txt || fail "charlm $cmd --help printed no usage"
    grep -q -- "--help" out.txt || fail "charlm $cmd --help does not list --help"
  done
  grep -q -- "--top-k" <("$charlm" sample --help) || fail "sample --help lacks --top-k"
  grep -q -- "--segments" <("$charlm" compare --help) || fail "compare --help lacks --segments"
  "$charlm" >/dev/null 2>err.txt
  [ $? -eq 2 ] || fail "charlm without a command should exit 2"
  grep -q "usage: charlm" err.txt || fail "charlm without a command should print the usage"
  ;;

bad_flags)
  make_text
  expect_usage_error "unknown flag --bogus" train --data text.txt --out r --bogus 1
  expect_usage_error "--lr needs a value" train --data text.txt --out r --lr
  expect_usage_error "--lr needs a value" train --data text.txt --out r --lr --iters 5
  expect_usage_error "--lr: expected a finite number, got 'fast'" train --data text.txt --out r --lr fast
  expect_usage_error "--lr must be > 0" train --data text.txt --out r --lr 0
  expect_usage_error "--layers must be >= 1, got 0" train --data text.txt --out r --layers 0
  expect_usage_error "--iters: expected an integer, got '1e3'" train --data text.txt --out r --iters 1e3
  expect_usage_error "--device must be one of auto|cpu|cuda, got 'tpu'" train --data text.txt --out r --device tpu
  expect_usage_error "--heads 5 must divide --width 32" train --data text.txt --out r --heads 5 --width 32
  expect_usage_error "--segments (64,128) and --dilations (1,2,4) must have the same number of entries" \
    train --data text.txt --out r --attention dilated --segments 64,128
  expect_usage_error "--dilations: every entry must be >= 1, got 0" \
    train --data text.txt --out r --attention dilated --dilations 1,0,2
  expect_usage_error "--segments: expected comma-separated integers" \
    train --data text.txt --out r --attention dilated --segments 64,,128
  expect_usage_error "--segments applies to --attention dilated only" train --data text.txt --out r --segments 8,16
  expect_usage_error "--warmup 100 exceeds the decay length 10" train --data text.txt --out r --iters 10
  expect_usage_error "--data is required" train --out r
  expect_usage_error "--data: cannot read 'missing.txt'" train --data missing.txt --out r --iters 200
  expect_usage_error "--resume: nowhere/last.ckpt does not exist" train --resume nowhere
  expect_usage_error "--layers must be >= 1, got 0" train --data text.txt --out r --layers 2 --layers 0
  expect_usage_error "unexpected argument 'extra'" train extra
  expect_usage_error "--ckpt is required" sample --tokens 5
  expect_usage_error "--temperature must be >= 0, got -1" sample --ckpt x.ckpt --temperature -1
  expect_usage_error "--ckpt: x.ckpt does not exist" sample --ckpt x.ckpt
  expect_usage_error "unknown flag --attention" compare --data text.txt --out c --attention vanilla
  expect_usage_error "unknown command 'fit'" fit --data text.txt
  [ ! -e r ] || fail "a rejected command line created the output directory"
  ;;

train)
  make_text
  "$charlm" train "${TINY[@]}" --out run --iters 30 --eval-interval 10 --log-interval 5 >out.txt 2>err.txt ||
    fail "training exited $?: $(cat err.txt)"
  for f in log.csv last.ckpt best.ckpt loss.png; do [ -s run/$f ] || fail "run/$f missing or empty"; done
  ls run | grep -q '\.tmp$' && fail "temporary files left in run/: $(ls run)"
  [ "$(head -1 run/log.csv)" = "step,train_loss,val_loss,lr,tokens_per_s" ] || fail "log.csv header: $(head -1 run/log.csv)"
  [ "$(wc -l <run/log.csv)" -eq 8 ] || fail "log.csv should have a header and 7 rows (steps 0, 5, ..., 30): $(cat run/log.csv)"
  [ "$(tail -1 run/log.csv | cut -d, -f1)" = 30 ] || fail "the last row is not step 30"
  first_val=$(sed -n 2p run/log.csv | cut -d, -f3)
  last_val=$(tail -1 run/log.csv | cut -d, -f3)
  awk -v a="$first_val" -v b="$last_val" 'BEGIN { exit !(b < a) }' ||
    fail "validation loss did not fall: $first_val at step 0, $last_val at step 30"
  [ "$(head -c 8 run/loss.png | tail -c 7 | head -c 3)" = "PNG" ] || fail "loss.png is not a PNG"
  grep -q "step 30/30" out.txt || fail "no progress line for step 30"
  grep -q "done: step 30" out.txt || fail "no final summary"
  # A second run into the same directory is refused (it would clobber the first).
  expect_usage_error "--out: run already holds a run" train "${TINY[@]}" --out run --iters 30
  ;;

resume)
  make_text
  common=("${TINY[@]}" --eval-interval 10 --log-interval 3 --decay-iters 20)
  "$charlm" train "${common[@]}" --out whole --iters 20 >/dev/null || fail "the uninterrupted run failed"
  "$charlm" train "${common[@]}" --out split --iters 10 >/dev/null || fail "the first half failed"
  # No --device: the run continues on the device it trained on (the CPU).
  "$charlm" train --resume split --iters 20 --threads 1 >out.txt || fail "the resumed run failed"
  grep -q "resuming split at step 10 of 20" out.txt || fail "no resume message: $(cat out.txt)"
  diff <(log_without_timing whole/log.csv) <(log_without_timing split/log.csv) >diff.txt ||
    fail "the resumed run's log differs from the uninterrupted one: $(cat diff.txt)"
  [ "$(wc -l <whole/log.csv)" -eq 10 ] || fail "expected 9 rows, got $(cat whole/log.csv)"
  # The recipe is fixed on resume; run-level flags may change.
  expect_usage_error "--lr: a resumed run keeps its recipe, and the checkpoint has 0.001" \
    train --resume split --iters 30 --lr 0.002
  expect_usage_error "--attention: a resumed run keeps its recipe, and the checkpoint has vanilla" \
    train --resume split --attention dilated
  ;;

interrupt)
  make_text
  # A long run stopped by SIGINT once a few rows are logged, then resumed
  # for 10 more steps, matches a fresh run of the same length.
  common=("${TINY[@]}" --eval-interval 20 --log-interval 4 --decay-iters 100000)
  "$charlm" train "${common[@]}" --out stopped --iters 100000 >out.txt 2>err.txt &
  pid=$!
  for _ in $(seq 1 600); do
    [ "$(wc -l <stopped/log.csv 2>/dev/null || echo 0)" -ge 4 ] && break
    sleep 0.05
  done
  kill -INT $pid
  wait $pid
  rc=$?
  [ $rc -eq 130 ] || fail "an interrupted run should exit 130 (128 + SIGINT), got $rc: $(cat err.txt)"
  grep -q "interrupted by SIGINT at step" out.txt || fail "no interruption message: $(tail -2 out.txt)"
  grep -q "charlm train --resume stopped" out.txt || fail "the message does not say how to resume"
  step=$(grep -o "interrupted by SIGINT at step [0-9]*" out.txt | grep -o "[0-9]*$")
  end=$((step + 10))
  "$charlm" train --resume stopped --iters $end --threads 1 --device cpu >/dev/null || fail "resuming failed"
  "$charlm" train "${common[@]}" --out fresh --iters $end >/dev/null || fail "the reference run failed"
  diff <(log_without_timing fresh/log.csv) <(log_without_timing stopped/log.csv) >diff.txt ||
    fail "stopped at step $step and resumed, the log differs from an uninterrupted run: $(cat diff.txt)"
  ;;

sample)
  make_text
  "$charlm" train "${TINY[@]}" --out run --iters 5 --eval-interval 5 >/dev/null || fail "training failed"
  "$charlm" sample --ckpt run/best.ckpt --prompt "the " --tokens 40 --threads 1 >out.txt 2>err.txt ||
    fail "sample exited $?: $(cat err.txt)"
  [ "$(wc -c <out.txt)" -eq 45 ] || fail "expected 'the ' + 40 characters + newline, got $(wc -c <out.txt) bytes"
  [ "$(head -c 4 out.txt)" = "the " ] || fail "the output does not start with the prompt"
  "$charlm" sample --ckpt run/best.ckpt --tokens 25 --temperature 0 >a.txt || fail "greedy sampling failed"
  "$charlm" sample --ckpt run/best.ckpt --tokens 25 --temperature 0 >b.txt || fail "greedy sampling failed"
  cmp -s a.txt b.txt || fail "greedy sampling is not deterministic"
  [ "$(wc -c <a.txt)" -eq 26 ] || fail "expected 25 characters + newline without a prompt"
  "$charlm" sample --ckpt run/last.ckpt --tokens 30 --seed 7 --top-k 3 >a.txt || fail "top-k sampling failed"
  "$charlm" sample --ckpt run/last.ckpt --tokens 30 --seed 7 --top-k 3 >b.txt || fail "top-k sampling failed"
  cmp -s a.txt b.txt || fail "the same --seed gives different samples"
  expect_usage_error "--prompt: character 'Z' at position 1 does not occur in the training text" \
    sample --ckpt run/best.ckpt --prompt "aZ"
  ;;

compare)
  make_text
  "$charlm" compare "${TINY[@]}" --out cmp --iters 10 --eval-interval 5 --log-interval 5 \
    --segments 4,8,16 --dilations 1,2,4 >out.txt 2>err.txt || fail "compare exited $?: $(cat err.txt)"
  for f in compare.csv compare.png summary.txt vanilla/log.csv vanilla/best.ckpt dilated/log.csv dilated/best.ckpt; do
    [ -s cmp/$f ] || fail "cmp/$f missing or empty"
  done
  [ "$(head -1 cmp/compare.csv)" = "step,vanilla_train_loss,vanilla_val_loss,dilated_train_loss,dilated_val_loss" ] ||
    fail "compare.csv header: $(head -1 cmp/compare.csv)"
  [ "$(wc -l <cmp/compare.csv)" -eq 4 ] || fail "compare.csv should have rows for steps 0, 5, 10: $(cat cmp/compare.csv)"
  grep -q "^attention  *final val  *best val" out.txt || fail "no summary table: $(tail -5 out.txt)"
  grep -q "^vanilla " out.txt && grep -q "^dilated " out.txt || fail "the table lacks a row"
  grep -qa "dilated" cmp/dilated/last.ckpt || fail "the dilated run's checkpoint is not dilated"
  grep -qa "dilated" cmp/vanilla/last.ckpt && fail "the vanilla run's checkpoint is dilated"
  ;;

*)
  fail "unknown case '$case_name'"
  ;;
esac
echo "ok [$case_name]"
