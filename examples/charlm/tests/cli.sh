#!/usr/bin/env bash
# Command-line tests of charlm, one case per ctest test:
#   cli.sh CHARLM CASE SCRATCH_DIR
# Cases: help bad_flags train resume interrupt interrupt_eval run_ids errors
# sample compare compare_resume profile data_parallel sequence_parallel parallel_cuda. Each trains
# tiny models on a small generated text on one CPU thread (a few seconds); parallel_cuda needs a GPU
# and exits 77 (skipped) without one.
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

# same_losses A B [TOL]: every log row's train and validation losses agree to TOL relative (1e-4).
same_losses() {
  local tol=${3:-1e-4}
  [ "$(wc -l <"$1/log.csv")" -eq "$(wc -l <"$2/log.csv")" ] || fail "$1 and $2 have different rows"
  paste -d, <(cut -d, -f1-3 "$1/log.csv" | tail -n +2) <(cut -d, -f1-3 "$2/log.csv" | tail -n +2) |
    awk -F, -v tol="$tol" '{ for (i = 2; i <= 3; ++i) { a = $i; b = $(i + 3); if (a == "" && b == "") continue;
                 d = a - b; if (d < 0) d = -d; m = a < 0 ? -a : a;
                 if ($1 != $4 || a == "" || b == "" || d > tol * m) { print "step " $1 ": " a " vs " b; exit 1 } } }' \
    >diff.txt || fail "$1 and $2 differ: $(cat diff.txt)"
}

# The log without the timing and run id columns (they differ between runs).
log_without_timing() { cut -d, -f1-4 "$1"; }

# The run id of a run directory's log.csv (its last column, one value).
log_run_id() { tail -n +2 "$1/log.csv" | cut -d, -f7 | sort -u; }

# wait_for_rows FILE N: until FILE has at least N lines (gives up after 30 s).
wait_for_rows() {
  for _ in $(seq 1 600); do
    [ "$({ wc -l <"$1"; } 2>/dev/null || echo 0)" -ge "$2" ] && return 0
    sleep 0.05
  done
  return 1
}

# wait_for_file FILE: until FILE exists (gives up after 30 s).
wait_for_file() {
  for _ in $(seq 1 600); do
    [ -e "$1" ] && return 0
    sleep 0.05
  done
  return 1
}

# interrupt_and_resume "RESUME_FLAGS" TRAIN_FLAGS...: a long run (every 4th
# step logged) stopped by SIGINT once a few rows are logged, then resumed
# (with RESUME_FLAGS, split on spaces) for 10 more steps, matches a fresh run
# of the same length. Sets `step`: where the signal stopped it.
interrupt_and_resume() {
  local resume_flags=$1 pid rc end
  shift
  local common=("$@" --eval-interval 20 --log-interval 4 --decay-iters 100000)
  "$charlm" train "${common[@]}" --out stopped --iters 100000 >out.txt 2>err.txt &
  pid=$!
  wait_for_rows stopped/log.csv 4 || fail "no rows logged: $(cat out.txt err.txt)"
  kill -INT $pid
  wait $pid
  rc=$?
  [ $rc -eq 130 ] || fail "an interrupted run should exit 130 (128 + SIGINT), got $rc: $(cat err.txt)"
  grep -q "charlm train --resume stopped" out.txt || fail "the message does not say how to resume"
  step=$(grep -o "interrupted by SIGINT at step [0-9]*" out.txt | grep -o "[0-9]*$")
  [ -n "$step" ] || fail "no interruption message: $(tail -2 out.txt)"
  end=$((step + 10))
  # shellcheck disable=SC2086
  "$charlm" train --resume stopped --iters $end --threads 1 --device cpu $resume_flags >/dev/null 2>err.txt ||
    fail "resuming failed: $(cat err.txt)"
  "$charlm" train "${common[@]}" --out fresh --iters $end >/dev/null || fail "the reference run failed"
  diff <(log_without_timing fresh/log.csv) <(log_without_timing stopped/log.csv) >diff.txt ||
    fail "stopped at step $step and resumed, the log differs from an uninterrupted run: $(cat diff.txt)"
}

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
  expect_usage_error "--attention-dropout applies to --attention dilated only" \
    train --data text.txt --out r --attention-dropout per_pair
  expect_usage_error "--warmup 100 exceeds the decay length 10" train --data text.txt --out r --iters 10
  expect_usage_error "--data is required" train --out r
  expect_usage_error "--data: cannot read 'missing.txt': No such file or directory" train --data missing.txt --out r --iters 200
  mkdir texts
  expect_usage_error "--data: 'texts' is a directory; give the text file to learn" train --data texts --out r
  expect_usage_error "--resume: nowhere/compare.run does not exist (not a directory written by charlm compare)" \
    compare --resume nowhere
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
  [ "$(head -1 run/log.csv)" = "step,train_loss,val_loss,lr,tokens_per_s,elapsed_s,run_id" ] ||
    fail "log.csv header: $(head -1 run/log.csv)"
  [ "$(wc -l <run/log.csv)" -eq 8 ] || fail "log.csv should have a header and 7 rows (steps 0, 5, ..., 30): $(cat run/log.csv)"
  [ "$(tail -1 run/log.csv | cut -d, -f1)" = 30 ] || fail "the last row is not step 30"
  first_val=$(sed -n 2p run/log.csv | cut -d, -f3)
  last_val=$(tail -1 run/log.csv | cut -d, -f3)
  awk -v a="$first_val" -v b="$last_val" 'BEGIN { exit !(b < a) }' ||
    fail "validation loss did not fall: $first_val at step 0, $last_val at step 30"
  [ "$(head -c 8 run/loss.png | tail -c 7 | head -c 3)" = "PNG" ] || fail "loss.png is not a PNG"
  grep -q "step 30/30" out.txt || fail "no progress line for step 30"
  # The validation loss is bare when measured, with its step after that.
  grep -q "^step 10/30 | train [0-9.]* | val [0-9.]* (new best) | lr" out.txt || fail "no fresh val at step 10: $(cat out.txt)"
  grep -q "^step 15/30 | train [0-9.]* | val [0-9.]* (step 10) | lr" out.txt || fail "no val (step 10) at step 15: $(cat out.txt)"
  # elapsed_s grows; every row has the run's id, the one in the checkpoints.
  cut -d, -f6 run/log.csv | tail -n +2 | sort -c -g || fail "elapsed_s does not grow: $(cat run/log.csv)"
  id=$(log_run_id run)
  [[ "$id" =~ ^[0-9a-f]{16}$ ]] || fail "log.csv run ids: '$id'"
  grep -qa "$id" run/last.ckpt && grep -qa "$id" run/best.ckpt || fail "the checkpoints lack the run id $id"
  grep -q "(run $id)" out.txt || fail "the first line does not name the run id"
  grep -q "done: step 30" out.txt || fail "no final summary"
  # A second run into the same directory is refused (it would clobber the first).
  expect_usage_error "--out: run already holds a run (last.ckpt, best.ckpt, log.csv, loss.png); continue it with --resume run" \
    train "${TINY[@]}" --out run --iters 30
  ;;

profile)
  make_text
  "$charlm" train "${TINY[@]}" --profile 4 >out.txt 2>err.txt || fail "--profile exited $?: $(cat err.txt)"
  grep -q "^profile: 4 steps after 3 warm-up steps, batch 4 x context 16, .* parameters, cpu, float32$" out.txt ||
    fail "no profile heading: $(cat out.txt)"
  for phase in data forward backward optimizer step; do
    grep -Eq "^$phase +[0-9]+\.[0-9]{3}$" out.txt || fail "no '$phase' row: $(cat out.txt)"
  done
  grep -Eq "^wall [0-9.]+ ms/step, [0-9]+ tokens/s$" out.txt || fail "no wall time and tokens/s: $(cat out.txt)"
  [ "$(ls | tr '\n' ' ')" = "err.txt out.txt text.txt " ] || fail "--profile wrote files: $(ls)"
  expect_usage_error "--profile writes nothing; leave --out out" train "${TINY[@]}" --profile 4 --out run
  expect_usage_error "--profile times a fresh model; leave --resume out" train --resume run --profile 4
  expect_usage_error "--profile must be" train "${TINY[@]}" --profile -1
  ;;

resume)
  make_text
  common=("${TINY[@]}" --eval-interval 10 --log-interval 3 --decay-iters 20)
  "$charlm" train "${common[@]}" --out whole --iters 20 >/dev/null || fail "the uninterrupted run failed"
  "$charlm" train "${common[@]}" --out split --iters 10 >/dev/null || fail "the first half failed"
  # A row torn by a crash while it was appended (no newline) is dropped; its
  # step lies past the checkpoint's and is recomputed.
  printf '11,2.4' >>split/log.csv
  # No --device: the run continues on the device it trained on (the CPU).
  "$charlm" train --resume split --iters 20 --threads 1 >out.txt 2>err.txt || fail "the resumed run failed"
  grep -q "resuming split at step 10 of 20" out.txt || fail "no resume message: $(cat out.txt)"
  grep -q "split/log.csv: dropped an incomplete last line" err.txt || fail "no message about the torn row: $(cat err.txt)"
  diff <(log_without_timing whole/log.csv) <(log_without_timing split/log.csv) >diff.txt ||
    fail "the resumed run's log differs from the uninterrupted one: $(cat diff.txt)"
  [ "$(wc -l <whole/log.csv)" -eq 10 ] || fail "expected 9 rows, got $(cat whole/log.csv)"
  # The recipe is fixed on resume; run-level flags may change.
  expect_usage_error "--lr: a resumed run keeps its recipe, and the checkpoint has 0.001" \
    train --resume split --iters 30 --lr 0.002
  expect_usage_error "--attention: a resumed run keeps its recipe, and the checkpoint has vanilla" \
    train --resume split --attention dilated
  expect_usage_error "--segments applies to --attention dilated only, and the checkpoint's run has vanilla attention" \
    train --resume split --segments 8,16
  # A dilated run's own --segments are its recipe, not a change.
  "$charlm" train "${common[@]}" --attention dilated --segments 8,16 --dilations 1,2 --out dil --iters 4 \
    >/dev/null || fail "the dilated run failed"
  "$charlm" train --resume dil --iters 6 --segments 8,16 --threads 1 >/dev/null ||
    fail "resuming a dilated run with its own --segments failed"
  expect_usage_error "--segments: a resumed run keeps its recipe, and the checkpoint has 8,16" \
    train --resume dil --segments 8,32
  expect_usage_error "--attention-dropout: a resumed run keeps its recipe, and the checkpoint has per_copy" \
    train --resume dil --attention-dropout per_pair
  # Per-pair attention dropout (these branches nest) is kept as well.
  "$charlm" train "${common[@]}" --attention dilated --segments 8,16 --dilations 1,2 --attention-dropout per_pair \
    --out dilpp --iters 4 >/dev/null || fail "the per-pair dilated run failed"
  "$charlm" train --resume dilpp --iters 6 --threads 1 >/dev/null || fail "resuming the per-pair run failed"
  expect_usage_error "--attention-dropout: a resumed run keeps its recipe, and the checkpoint has per_pair" \
    train --resume dilpp --attention-dropout per_copy
  [ "$(log_run_id split | wc -l)" -eq 1 ] || fail "the resumed run's log has several run ids: $(cat split/log.csv)"
  ;;

interrupt)
  make_text
  # One rank stops after the step in flight, wherever that is.
  interrupt_and_resume "" "${TINY[@]}"
  ;;

interrupt_eval)
  make_text
  # Many validation batches make each evaluation last well past the 0.2 s the
  # signal waits (about a second on an idle 2-core machine; at 5,000 batches
  # one took under 0.2 s there and the signal came after it).
  common=("${TINY[@]}" --eval-iters 30000 --eval-interval 5 --log-interval 5 --decay-iters 10)
  "$charlm" train "${common[@]}" --out stopped --iters 10 >out.txt 2>err.txt &
  pid=$!
  # The step-0 row, checkpoint and plot (written last) are done: the evaluation
  # of step 5 follows within milliseconds and lasts most of a second. (Waiting
  # for the row alone left the checkpoint's and plot's disk writes inside the
  # sleep: on a busy machine the signal then came before step 5.)
  wait_for_rows stopped/log.csv 2 || fail "no step-0 row: $(cat out.txt err.txt)"
  wait_for_file stopped/loss.png || fail "no step-0 plot: $(cat out.txt err.txt)"
  sleep 0.2
  kill -INT $pid
  wait $pid
  rc=$?
  [ $rc -eq 130 ] || fail "a run stopped during evaluation should exit 130, got $rc: $(cat err.txt)"
  grep -q "interrupted by SIGINT at step 5 of 10 (during its evaluation" out.txt ||
    fail "the evaluation was not abandoned at step 5: $(cat out.txt)"
  grep -q "^\[charlm\] stopping: saving the last completed step" err.txt || fail "no notice of the signal: $(cat err.txt)"
  [ "$(wc -l <stopped/log.csv)" -eq 2 ] || fail "the abandoned evaluation wrote a row: $(cat stopped/log.csv)"
  # The resumed run redoes the evaluation of step 5, and its log matches an uninterrupted run.
  "$charlm" train --resume stopped --iters 5 --threads 1 >out.txt || fail "resuming failed"
  grep -q "resuming stopped at step 5 of 5 on cpu (float32), first redoing the interrupted evaluation" out.txt ||
    fail "no resume message: $(cat out.txt)"
  "$charlm" train "${common[@]}" --out fresh --iters 5 >/dev/null || fail "the reference run failed"
  diff <(log_without_timing fresh/log.csv) <(log_without_timing stopped/log.csv) >diff.txt ||
    fail "stopped during the evaluation and resumed, the log differs from an uninterrupted run: $(cat diff.txt)"
  # A second signal quits at once. Both are made pending while the process is
  # stopped; the handler of the first blocks the second, which then finds
  # the default action (the program ends, by that signal, saving nothing).
  # ThreadSanitizer queues signals and delivers them itself: there the second
  # does not meet the default action the first handler set.
  if [ "${MINIDL_SANITIZE:-}" = thread ]; then
    echo "skipped under ThreadSanitizer: the second signal (it delivers signals itself)"
    exit 0
  fi
  "$charlm" train "${common[@]}" --out twice --iters 10 >out.txt 2>err.txt &
  pid=$!
  wait_for_rows twice/log.csv 1 || fail "the run did not start: $(cat out.txt err.txt)"
  kill -STOP $pid
  kill -INT $pid
  kill -TERM $pid
  kill -CONT $pid
  wait $pid
  rc=$?
  [ $rc -eq 130 ] || [ $rc -eq 143 ] || fail "two signals should end the program by a signal, got exit $rc"
  grep -q "interrupted by" out.txt && fail "after a second signal the run still saved: $(cat out.txt)"
  grep -q "stopping: saving the last completed step" err.txt || fail "no notice of the first signal: $(cat err.txt)"
  ;;

run_ids)
  make_text
  "$charlm" train "${TINY[@]}" --out a --iters 5 --eval-interval 5 >/dev/null || fail "run a failed"
  "$charlm" train "${TINY[@]}" --out b --iters 5 --eval-interval 5 --seed 2 >/dev/null || fail "run b failed"
  [ "$(log_run_id a)" != "$(log_run_id b)" ] || fail "two runs have the same id $(log_run_id a)"
  # Any run artifact refuses --out (an empty directory is fine).
  for f in log.csv loss.png best.ckpt compare.csv; do
    mkdir -p "with_$f" && touch "with_$f/$f"
    expect_usage_error "--out: with_$f already holds a run ($f); choose another directory" \
      train "${TINY[@]}" --out "with_$f" --iters 5
  done
  mkdir empty
  "$charlm" train "${TINY[@]}" --out empty --iters 5 --eval-interval 5 >/dev/null || fail "an empty --out was refused"
  # Files of another run are refused on resume.
  cp -r a mixed && cp b/last.ckpt mixed/last.ckpt
  expect_usage_error "--resume: mixed/log.csv has rows of run $(log_run_id a), but last.ckpt is run $(log_run_id b)" \
    train --resume mixed --iters 10
  cp -r a mixed_best && cp b/best.ckpt mixed_best/best.ckpt
  expect_usage_error "--resume: mixed_best/best.ckpt is run $(log_run_id b), but last.ckpt is run $(log_run_id a)" \
    train --resume mixed_best --iters 10
  # A log of the older format (no run ids) does not go with a checkpoint that has one.
  cp -r a old_log && { echo "step,train_loss,val_loss,lr,tokens_per_s"; tail -n +2 a/log.csv | cut -d, -f1-5; } >old_log/log.csv
  expect_usage_error "--resume: old_log/log.csv has rows of run (no run id: an older charlm), but last.ckpt is run" \
    train --resume old_log --iters 10
  id_a=$(log_run_id a)
  "$charlm" train --resume a --iters 10 --threads 1 >/dev/null || fail "resuming a failed"
  [ "$(log_run_id a)" = "$id_a" ] || fail "the resumed run changed its id: $(cat a/log.csv)"
  ;;

errors)
  make_text
  # Errors other than usage: one line 'charlm CMD: error: ...' on stderr, no blank line before it.
  if [ -w /dev/full ]; then
    mkdir full && ln -s /dev/full full/log.csv.tmp
    "$charlm" train "${TINY[@]}" --out full --iters 5 >out.txt 2>err.txt
    rc=$?
    [ $rc -eq 1 ] || fail "a failed log write should exit 1, got $rc: $(cat err.txt)"
    [ "$(wc -l <err.txt)" -eq 1 ] || fail "expected a one-line error, got: $(cat -A err.txt)"
    grep -q "^charlm train: error: charlm: cannot write full/log.csv: No space left on device$" err.txt ||
      fail "the log write error does not give the reason: $(cat err.txt)"
    [ -z "$(ls full)" ] || fail "a failed log write left files behind: $(ls full)"
  fi
  # A comparison that fails before training leaves no directory that --out would then refuse.
  head -c 300 text.txt >small.txt
  "$charlm" compare "${TINY[@]}" --data small.txt --context 64 --out small >out.txt 2>err.txt
  [ $? -eq 2 ] || fail "compare on too small a text should exit 2: $(cat err.txt)"
  grep -q "too small for --context 64" err.txt || fail "unexpected error: $(cat err.txt)"
  [ ! -e small ] || fail "the failed compare left $(ls -R small)"
  echo "not a checkpoint" >bad.ckpt
  "$charlm" sample --ckpt bad.ckpt >out.txt 2>err.txt
  [ $? -eq 1 ] || fail "sampling a bad checkpoint should exit 1"
  [ "$(wc -l <err.txt)" -eq 1 ] && grep -q "^charlm sample: error: " err.txt ||
    fail "expected one line 'charlm sample: error: ...', got: $(cat -A err.txt)"
  ;;

sample)
  make_text
  "$charlm" train "${TINY[@]}" --out run --iters 5 --eval-interval 5 >/dev/null || fail "training failed"
  "$charlm" sample --ckpt run/best.ckpt --prompt "the " --tokens 40 --threads 1 >out.txt 2>err.txt ||
    fail "sample exited $?: $(cat err.txt)"
  [ "$(wc -c <out.txt)" -eq 45 ] || fail "expected 'the ' + 40 characters + newline, got $(wc -c <out.txt) bytes"
  [ "$(head -c 4 out.txt)" = "the " ] || fail "the output does not start with the prompt"
  # stdout is only the text; the speed is one line on stderr.
  [ "$(wc -l <err.txt)" -eq 1 ] && grep -qE '^charlm sample: 40 characters in [0-9]+\.[0-9]{3} s \([0-9]+\.[0-9] characters/s\)$' err.txt ||
    fail "expected one line 'charlm sample: 40 characters in S s (R characters/s)' on stderr, got: $(cat -A err.txt)"
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
  [ "$(head -1 cmp/compare.csv)" = "step,vanilla_train_loss,vanilla_val_loss,dilated_train_loss,dilated_val_loss,vanilla_elapsed_s,dilated_elapsed_s" ] ||
    fail "compare.csv header: $(head -1 cmp/compare.csv)"
  [ "$(wc -l <cmp/compare.csv)" -eq 4 ] || fail "compare.csv should have rows for steps 0, 5, 10: $(cat cmp/compare.csv)"
  grep -q "^attention  *final val  *best val" out.txt || fail "no summary table: $(tail -5 out.txt)"
  grep -q "^vanilla " out.txt && grep -q "^dilated " out.txt || fail "the table lacks a row"
  grep -qa "dilated" cmp/dilated/last.ckpt || fail "the dilated run's checkpoint is not dilated"
  grep -qa "dilated" cmp/vanilla/last.ckpt && fail "the vanilla run's checkpoint is dilated"
  [ -s cmp/compare.run ] || fail "no cmp/compare.run"
  grep -q "warning" err.txt && fail "a warning without clamped segments: $(cat err.txt)"
  expect_usage_error "--out: cmp already holds a run (compare.run, compare.csv, compare.png, summary.txt, vanilla, dilated); continue it with --resume cmp" \
    compare "${TINY[@]}" --out cmp --iters 10
  ;;

compare_resume)
  make_text
  # Segment 32 exceeds the context 16: dilated attention uses 16.
  common=("${TINY[@]}" --eval-interval 20 --log-interval 4 --decay-iters 100000 --segments 4,8,32 --dilations 1,2,4)
  "$charlm" compare "${common[@]}" --out stopped --iters 100000 >out.txt 2>err.txt &
  pid=$!
  wait_for_rows stopped/vanilla/log.csv 4 || fail "the vanilla run logged nothing: $(cat out.txt err.txt)"
  kill -INT $pid
  wait $pid
  rc=$?
  [ $rc -eq 130 ] || fail "an interrupted compare should exit 130, got $rc: $(cat err.txt)"
  grep -q "^charlm compare: warning: --segments 4,8,32 exceed --context 16; .* the effective segments are 4,8,16$" err.txt ||
    fail "no warning about the clamped segment: $(cat err.txt)"
  grep -q "Continue with: charlm compare --resume stopped" err.txt || fail "no hint to resume: $(cat err.txt)"
  step=$(grep -o "interrupted by SIGINT at step [0-9]*" out.txt | grep -o "[0-9]*$")
  [ -n "$step" ] || fail "no interruption message: $(cat out.txt)"
  end=$((step + 10))
  expect_usage_error "--lr: a resumed run keeps its recipe, and the checkpoint has 0.001" \
    compare --resume stopped --lr 0.01
  "$charlm" compare --resume stopped --iters $end --threads 1 >out.txt 2>err.txt ||
    fail "compare --resume failed: $(cat err.txt)"
  grep -q "\[vanilla\] resuming stopped/vanilla at step $step of $end" out.txt || fail "vanilla did not resume: $(cat out.txt)"
  "$charlm" compare "${common[@]}" --out fresh --iters $end >/dev/null 2>&1 || fail "the reference compare failed"
  diff <(cut -d, -f1-5 fresh/compare.csv) <(cut -d, -f1-5 stopped/compare.csv) >diff.txt ||
    fail "the resumed comparison differs from an uninterrupted one: $(cat diff.txt)"
  grep -q "segments 4,8,32 (effective 4,8,16)" stopped/summary.txt || fail "summary.txt: $(cat stopped/summary.txt)"
  # Run directories of another comparison are refused.
  rm -r fresh/vanilla && cp -r stopped/vanilla fresh/vanilla
  expect_usage_error "--resume: fresh/vanilla/last.ckpt is run $(log_run_id stopped/vanilla), not " compare --resume fresh
  ;;

data_parallel)
  make_text
  # --dp N: N in-process ranks, each on batch / N rows of the global batch.
  # Without dropout (each rank draws its own masks) the losses equal one
  # rank's on the same global batch, up to float rounding.
  common=("${TINY[@]}" --dropout 0 --eval-interval 10 --log-interval 1 --decay-iters 30)
  "$charlm" train "${common[@]}" --out one --iters 30 >/dev/null || fail "the one-rank run failed"
  for n in 2 4; do
    "$charlm" train "${common[@]}" --out dp$n --iters 30 --dp $n >out.txt 2>err.txt ||
      fail "--dp $n exited $?: $(cat err.txt)"
    [ "$(wc -l <dp$n/log.csv)" -eq 32 ] || fail "--dp $n: expected 31 rows: $(cat dp$n/log.csv)"
    same_losses one dp$n
    [ "$(ls dp$n | tr '\n' ' ')" = "best.ckpt last.ckpt log.csv loss.png " ] || fail "--dp $n wrote $(ls dp$n)"
  done
  # In bfloat16 (the compute model's gradients reduced in float32 during
  # backward, then handed to the float32 masters) too, up to bfloat16 rounding.
  "$charlm" train "${common[@]}" --dtype bfloat16 --out bf-one --iters 30 >/dev/null 2>err.txt ||
    fail "the one-rank bfloat16 run failed: $(cat err.txt)"
  "$charlm" train "${common[@]}" --dtype bfloat16 --out bf-dp2 --iters 30 --dp 2 >/dev/null 2>err.txt ||
    fail "--dp 2 in bfloat16 failed: $(cat err.txt)"
  same_losses bf-one bf-dp2 1e-3
  # A run resumes at another --dp (the checkpoint does not depend on it).
  "$charlm" train "${common[@]}" --out mixed --iters 10 --dp 2 >/dev/null || fail "the --dp 2 part failed"
  "$charlm" train --resume mixed --iters 20 --threads 1 >/dev/null || fail "resuming at --dp 1 failed"
  "$charlm" train --resume mixed --iters 30 --threads 1 --dp 4 >/dev/null || fail "resuming at --dp 4 failed"
  same_losses one mixed
  expect_usage_error "--batch 4 must be a multiple of --dp 3" train "${common[@]}" --out r --iters 5 --dp 3
  expect_usage_error "--batch 4 must be a multiple of --dp 3" train --resume mixed --iters 40 --dp 3
  expect_usage_error "--profile times one rank; leave --dp out" train "${common[@]}" --profile 2 --dp 2
  grep -q -- "--dp" <("$charlm" train --help) || fail "train --help lacks --dp"
  # Stopped by SIGINT, the ranks resume as if never stopped (dropout on:
  # every rank's masks continue).
  interrupt_and_resume "--dp 2" "${TINY[@]}" --dp 2
  # Launched as several processes (WORLD_SIZE > 1): the ranks must match
  # --dp x --sp, and they train on CUDA through NCCL; nothing is written first.
  WORLD_SIZE=3 RANK=0 expect_usage_error "WORLD_SIZE=3 processes, but --dp 2 --sp 1 make 2 ranks" \
    train "${common[@]}" --out procs --iters 5 --dp 2
  WORLD_SIZE=2 RANK=1 expect_usage_error "several processes train on CUDA through NCCL" \
    train "${common[@]}" --out procs --iters 5 --dp 2 --device cpu
  [ ! -e procs ] || fail "a refused multi-process run wrote procs/"
  WORLD_SIZE=2 RANK=0 expect_usage_error "--profile times one process; leave WORLD_SIZE unset" \
    train "${common[@]}" --profile 2
  ;;

sequence_parallel)
  make_text
  # --sp M: M in-process ranks, each on context / M consecutive positions of
  # every sequence, attention across them (ops::seq_parallel_dilated_attention);
  # --dp N --sp M: N * M ranks. Without dropout the losses equal one rank's on
  # the same global batch, up to float rounding. Dilated: segments of 6 and 5
  # straddle the chunk boundaries of --sp 2 and 4 (chunks of 8 and 4), r = 3
  # with 2 heads; learned positions and rope.
  common=("${TINY[@]}" --layers 2 --dropout 0 --eval-interval 10 --log-interval 1 --decay-iters 30 --iters 30)
  dilated=(--attention dilated --segments 6,5,16 --dilations 1,3,2)
  for kind in vanilla dilated rope; do
    case $kind in
      vanilla) model=(--attention vanilla) ;;
      dilated) model=("${dilated[@]}") ;;
      rope) model=("${dilated[@]}" --pos rope) ;;
    esac
    "$charlm" train "${common[@]}" "${model[@]}" --out $kind-one >/dev/null || fail "the one-rank $kind run failed"
    for ranks in "--sp 2" "--sp 4" "--dp 2 --sp 2"; do
      out=$kind-$(echo $ranks | tr -d ' -')
      # shellcheck disable=SC2086
      "$charlm" train "${common[@]}" "${model[@]}" --out $out $ranks >out.txt 2>err.txt ||
        fail "$kind $ranks exited $?: $(cat err.txt)"
      [ "$(wc -l <$out/log.csv)" -eq 32 ] || fail "$kind $ranks: expected 31 rows: $(cat $out/log.csv)"
      same_losses $kind-one $out
      [ "$(ls $out | tr '\n' ' ')" = "best.ckpt last.ckpt log.csv loss.png " ] || fail "$kind $ranks wrote $(ls $out)"
    done
  done
  # In bfloat16 (the compute model's gradients reduced during backward beside
  # the attention's exchanges), up to bfloat16 rounding.
  "$charlm" train "${common[@]}" "${dilated[@]}" --dtype bfloat16 --out bf-one >/dev/null 2>err.txt ||
    fail "the one-rank bfloat16 run failed: $(cat err.txt)"
  "$charlm" train "${common[@]}" "${dilated[@]}" --dtype bfloat16 --out bf-dp2sp2 --dp 2 --sp 2 >/dev/null 2>err.txt ||
    fail "--dp 2 --sp 2 in bfloat16 failed: $(cat err.txt)"
  same_losses bf-one bf-dp2sp2 1e-3
  # A run resumes at another --sp (the checkpoint does not depend on it).
  "$charlm" train "${common[@]}" "${dilated[@]}" --out mixed --iters 10 --sp 2 >/dev/null || fail "the --sp 2 part failed"
  "$charlm" train --resume mixed --iters 20 --threads 1 >/dev/null || fail "resuming at --sp 1 failed"
  "$charlm" train --resume mixed --iters 30 --threads 1 --sp 4 --dp 2 >/dev/null || fail "resuming at --dp 2 --sp 4 failed"
  same_losses dilated-one mixed
  expect_usage_error "--context 16 must be a multiple of --sp 3" train "${common[@]}" --out r --sp 3
  # With dropout (attention dropout too): it trains, and resumes at another --sp.
  "$charlm" train "${TINY[@]}" "${dilated[@]}" --layers 2 --dropout 0.2 --eval-interval 5 --log-interval 1 \
    --iters 5 --out drop --sp 2 >/dev/null 2>err.txt || fail "--sp 2 with dropout failed: $(cat err.txt)"
  "$charlm" train --resume drop --iters 10 --threads 1 --sp 4 >/dev/null 2>err.txt ||
    fail "resuming a dropout run at --sp 4 failed: $(cat err.txt)"
  [ "$(wc -l <drop/log.csv)" -eq 12 ] || fail "--sp with dropout: expected 11 rows: $(cat drop/log.csv)"
  # Per-pair attention dropout over nested branches (on the CPU, as here).
  "$charlm" train "${TINY[@]}" --attention dilated --segments 4,8,16 --dilations 1,2,4 --attention-dropout per_pair \
    --layers 2 --dropout 0.2 --eval-interval 5 --log-interval 1 --iters 5 --out pair --sp 2 >/dev/null 2>err.txt ||
    fail "--sp 2 with per-pair dropout failed: $(cat err.txt)"
  [ "$(wc -l <pair/log.csv)" -eq 7 ] || fail "--sp with per-pair dropout: expected 6 rows: $(cat pair/log.csv)"
  expect_usage_error "--profile times one rank; leave --sp out" train "${common[@]}" --profile 2 --sp 2
  grep -q -- "--sp" <("$charlm" train --help) || fail "train --help lacks --sp"
  ;;

parallel_cuda)
  make_text
  # --dp / --sp on CUDA: with one GPU (or fewer GPUs than ranks, or no NCCL)
  # the ranks are virtual, threads sharing the GPU through the in-process
  # backend; with N * M GPUs, one rank per GPU through NCCL. Either way the
  # losses equal one rank's on the same global batch, up to the dtype's
  # rounding (the one-rank run and NCCL ranks replay CUDA graphs, virtual
  # ranks run eagerly): 1e-3 relative in float32, 3e-2 in bfloat16, over 30
  # steps.
  if ! "$charlm" train "${TINY[@]}" --device cuda --out probe --iters 2 >/dev/null 2>err.txt; then
    grep -q "no CUDA device is available" err.txt && { echo "skipped: no CUDA device"; exit 77; }
    fail "the probe run failed: $(cat err.txt)"
  fi
  # Head dim 32 (the tensor-core kernels take it in bfloat16); dilated
  # segments straddle the chunk boundaries of --sp 2 (chunks of 8). A row
  # every 3 steps: rank 0 announces up to 3 steps at once to NCCL ranks.
  gpu=(--data text.txt --device cuda --layers 2 --heads 2 --width 64 --context 16 --batch 4 --eval-iters 2
       --warmup 2 --dropout 0 --eval-interval 10 --log-interval 3 --decay-iters 30 --iters 30
       --attention dilated --segments 6,5,16 --dilations 1,3,2)
  for dtype in float32 bfloat16; do
    tol=$([ $dtype = float32 ] && echo 1e-3 || echo 3e-2)
    "$charlm" train "${gpu[@]}" --dtype $dtype --out $dtype-one >/dev/null 2>err.txt ||
      fail "the one-rank $dtype run failed: $(cat err.txt)"
    for ranks in "--dp 2" "--sp 2" "--dp 2 --sp 2" "--dp 2 --no-graph"; do
      out=$dtype-$(echo $ranks | tr -d ' -')
      # shellcheck disable=SC2086
      "$charlm" train "${gpu[@]}" --dtype $dtype --out $out $ranks >out.txt 2>err.txt ||
        fail "$dtype $ranks exited $?: $(cat err.txt)"
      [ "$(wc -l <$out/log.csv)" -eq 14 ] || fail "$dtype $ranks: expected 13 rows: $(cat $out/log.csv)"
      same_losses $dtype-one $out $tol
      [ "$(ls $out | tr '\n' ' ')" = "best.ckpt last.ckpt log.csv loss.png " ] || fail "$dtype $ranks wrote $(ls $out)"
    done
  done
  # Per-pair attention dropout over nested branches, sequence parallel: a
  # spanning piece computes its branch's share of the nested pairs.
  "$charlm" train "${TINY[@]}" --device cuda --dtype bfloat16 --attention dilated --segments 4,8,16 \
    --dilations 1,2,4 --attention-dropout per_pair --layers 2 --dropout 0.2 --eval-interval 5 --log-interval 1 \
    --iters 5 --out pair --sp 2 >/dev/null 2>err.txt || fail "--sp 2 with per-pair dropout on CUDA failed: $(cat err.txt)"
  [ "$(wc -l <pair/log.csv)" -eq 7 ] || fail "--sp with per-pair dropout on CUDA: expected 6 rows: $(cat pair/log.csv)"
  # Checkpoints written by rank 0 resume at another --dp and --sp.
  "$charlm" train "${gpu[@]}" --dtype float32 --out mixed --iters 10 --dp 2 --sp 2 >/dev/null 2>err.txt ||
    fail "the --dp 2 --sp 2 part failed: $(cat err.txt)"
  "$charlm" train --resume mixed --iters 20 >/dev/null 2>err.txt || fail "resuming at one rank failed: $(cat err.txt)"
  "$charlm" train --resume mixed --iters 30 --dp 4 >/dev/null 2>err.txt || fail "resuming at --dp 4 failed: $(cat err.txt)"
  same_losses float32-one mixed 1e-3
  ;;

*)
  fail "unknown case '$case_name'"
  ;;
esac
echo "ok [$case_name]"
