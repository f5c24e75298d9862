#!/usr/bin/env bash
# Command-line tests of charlm sample against bad checkpoints, one case per
# ctest test:
#   sample_cli.sh CHARLM CASE SCRATCH_DIR
# Cases: directory short_vocab huge_layers mismatch. The checkpoint cases
# train a one-step tiny model, then rewrite one metadata value of its
# checkpoint (with a valid checksum, docs/checkpoint-format.md), so that only
# the metadata is wrong; sample must refuse it with a clear error before
# building the model.
set -uo pipefail
export LC_ALL=C
charlm=$1
case_name=$2
scratch=$3
rm -rf "$scratch" && mkdir -p "$scratch" && cd "$scratch" || exit 1

fail() { echo "FAIL [$case_name]: $*" >&2; exit 1; }

# A one-layer model (width 16, context 16, learned positions) after one step.
train_tiny() {
  local i
  for i in $(seq 1 100); do echo "the quick brown fox $((i % 7)) jumps over the lazy dog."; done > text.txt
  "$charlm" train --data text.txt --out run --device cpu --threads 1 --layers 1 --heads 2 --width 16 \
    --context 16 --batch 2 --iters 1 --warmup 0 --eval-iters 1 >/dev/null 2>err.txt ||
    fail "training failed: $(cat err.txt)"
}

# Little-endian hex of an unsigned integer of $2 bytes.
le_hex() {
  local v=$1 n=$2 out="" i
  for ((i = 0; i < n; i++)); do
    out+=$(printf '%02x' $((v & 255)))
    v=$((v >> 8))
  done
  echo "$out"
}

# The integer at byte $1 (little-endian, $2 bytes) of the array `bytes`.
le_int() {
  local at=$1 n=$2 hex="" i
  for ((i = n - 1; i >= 0; i--)); do hex+=${bytes[at + i]}; done
  echo $((16#$hex))
}

# The hex of a string's bytes.
hex_of() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n'; }

# set_meta IN OUT KEY VALUE: IN with metadata KEY set to VALUE; VALUE may be
# hex:HEX (its bytes). Prints the old value as hex. The metadata table grows
# or shrinks, so a padding entry "~pad" (ignored by readers) keeps the size
# change a multiple of 64 bytes: the tensor table and the 64-byte-aligned
# data section after it are then copied unchanged.
set_meta() {
  local in=$1 out=$2 key=$3 value=$4
  [ "${value#hex:}" != "$value" ] && value=${value#hex:} || value=$(hex_of "$value")
  bytes=($(od -An -v -tx1 "$in"))
  local n=${#bytes[@]} count pos i klen vlen k table="" old="" delta pad
  count=$(le_int 32 4)
  pos=36
  for ((i = 0; i < count; i++)); do
    klen=$(le_int $pos 4)
    k=$(printf '%s' "${bytes[@]:pos + 4:klen}")
    vlen=$(le_int $((pos + 4 + klen)) 8)
    if [ "$k" = "$(hex_of "$key")" ]; then
      old=$(printf '%s' "${bytes[@]:pos + 4 + klen + 8:vlen}")
      table+=$(le_hex $klen 4)$k$(le_hex $((${#value} / 2)) 8)$value
    else
      table+=$(printf '%s' "${bytes[@]:pos:4 + klen + 8 + vlen}")
    fi
    pos=$((pos + 4 + klen + 8 + vlen))
  done
  delta=$((${#table} / 2 + 4 + 4 + 8 - (pos - 36)))  # + the "~pad" entry without its value
  pad=$(((64 - delta % 64) % 64))
  table=$(le_hex $((count + 1)) 4)$table$(le_hex 4 4)$(hex_of "~pad")$(le_hex $pad 8)
  table+=$(printf '%*s' $((2 * pad)) '' | tr ' ' 0)
  local body=$table$(printf '%s' "${bytes[@]:pos:n - pos}")
  # FNV-1a 64 of the body (bash arithmetic wraps modulo 2^64).
  local h=$((0xcbf29ce484222325)) b hex hash=""
  for b in $(fold -w2 <<<"$body"); do h=$(((h ^ 16#$b) * 0x100000001b3)); done
  hex=$(printf '%016x' $h)
  for ((i = 14; i >= 0; i -= 2)); do hash+=${hex:i:2}; done
  local header
  header=$(printf '%s' "${bytes[@]:0:16}")$(le_hex $((${#body} / 2)) 8)$hash
  printf "$(sed 's/../\\x&/g' <<<"$header$body")" >"$out"
  echo "$old"
}

# expect_error "substring" ARGS...: exit code 1 and the substring on stderr
# (a timeout, should sample start allocating without bound).
expect_error() {
  local want=$1
  shift
  timeout 60 "$charlm" "$@" >out.txt 2>err.txt
  local rc=$?
  [ "$rc" -eq 1 ] || fail "charlm $* exited $rc, expected 1 (stderr: $(cat err.txt))"
  grep -qF -- "$want" err.txt || fail "charlm $*: error '$(cat err.txt)' does not mention '$want'"
}

case $case_name in
directory)
  mkdir run
  for dir in run run/; do
    "$charlm" sample --ckpt $dir >out.txt 2>err.txt
    rc=$?
    [ $rc -eq 2 ] || fail "sample --ckpt $dir exited $rc, expected 2 (stderr: $(cat err.txt))"
    grep -qF -- "--ckpt: $dir is a directory; give a checkpoint file in it, e.g. run/best.ckpt" err.txt ||
      fail "sample --ckpt $dir: $(cat err.txt)"
  done
  ;;

short_vocab)
  train_tiny
  "$charlm" sample --ckpt run/best.ckpt --tokens 20 --temperature 0 --device cpu >want.txt 2>err.txt ||
    fail "sample failed: $(cat err.txt)"
  # The rewriting itself: the same vocabulary back gives a working checkpoint.
  vocab=$(set_meta run/best.ckpt same.ckpt vocab x)
  [ ${#vocab} -gt 20 ] || fail "no vocabulary found in run/best.ckpt"
  set_meta run/best.ckpt same.ckpt vocab "hex:$vocab" >/dev/null
  "$charlm" sample --ckpt same.ckpt --tokens 20 --temperature 0 --device cpu >got.txt 2>err.txt ||
    fail "the rewritten checkpoint fails: $(cat err.txt)"
  cmp -s want.txt got.txt || fail "the rewritten checkpoint samples differently"
  # One character short (the last: still sorted and distinct).
  set_meta run/best.ckpt short.ckpt vocab "hex:${vocab:0:${#vocab} - 2}" >/dev/null
  size=$((${#vocab} / 2))
  expect_error "short.ckpt: the vocabulary has $((size - 1)) characters but model.vocab_size is $size" \
    sample --ckpt short.ckpt --tokens 5 --device cpu
  ;;

huge_layers)
  train_tiny
  [ "$(set_meta run/best.ckpt huge.ckpt model.n_layer 1000000)" = "$(hex_of 1)" ] ||
    fail "run/best.ckpt does not have model.n_layer 1"
  expect_error "n_layer is 1000000 but the weights hold 1 blocks (h.0 .. h.0)" \
    sample --ckpt huge.ckpt --tokens 5 --device cpu
  ;;

mismatch)
  train_tiny
  set_meta run/best.ckpt bad.ckpt model.n_embd 32 >/dev/null
  expect_error "wte.weight is [" sample --ckpt bad.ckpt --tokens 5 --device cpu
  grep -qF "16], expected [" err.txt && grep -qF "n_embd 32" err.txt || fail "n_embd: $(cat err.txt)"
  set_meta run/best.ckpt bad.ckpt model.block_size 17 >/dev/null
  expect_error "wpe.weight is [16, 16], expected [17, 16] (position_embedding learned, block_size 17, n_embd 16)" \
    sample --ckpt bad.ckpt --tokens 5 --device cpu
  set_meta run/best.ckpt bad.ckpt model.position_embedding rope >/dev/null
  expect_error "wpe.weight is present (position_embedding rope" \
    sample --ckpt bad.ckpt --tokens 5 --device cpu
  set_meta run/best.ckpt bad.ckpt model.tie_weights false >/dev/null
  expect_error "lm_head.weight is missing (tie_weights false" \
    sample --ckpt bad.ckpt --tokens 5 --device cpu
  set_meta run/best.ckpt bad.ckpt model.n_head 3 >/dev/null
  expect_error "n_embd 16 must be a positive multiple of n_head 3" \
    sample --ckpt bad.ckpt --tokens 5 --device cpu
  ;;

*)
  fail "unknown case '$case_name'"
  ;;
esac
echo "ok [$case_name]"
