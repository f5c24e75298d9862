#!/usr/bin/env bash
# Fetches tiny shakespeare into DIR (default: data/). With MINIDL_DATA_DIR set,
# copies it from there instead of downloading (offline machines, CI). When the
# download fails, says how to use a local copy instead.
set -euo pipefail
source "$(dirname "$0")/common.sh"
minidl_absolute_paths
cd "$(dirname "$0")/.."
dir=${1:-data}
file=tinyshakespeare.txt
url=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
mkdir -p "$dir"
if [ -s "$dir/$file" ]; then
  echo "[minidl] $dir/$file already present"
  exit 0
fi

download() {
  if command -v curl >/dev/null 2>&1; then curl -fsSL --connect-timeout 30 "$url" -o "$dir/$file.tmp"
  elif command -v wget >/dev/null 2>&1; then wget -q --timeout=30 "$url" -O "$dir/$file.tmp"
  else echo "[minidl] neither curl nor wget is installed" >&2; return 1; fi
}

if [ -n "${MINIDL_DATA_DIR:-}" ]; then
  src="$MINIDL_DATA_DIR/$file"
  [ -s "$src" ] || { echo "[minidl] error: MINIDL_DATA_DIR=$MINIDL_DATA_DIR has no $file" >&2; exit 1; }
  cp "$src" "$dir/$file.tmp"
else
  echo "[minidl] downloading $url"
  if ! download; then
    rm -f "$dir/$file.tmp"
    cat >&2 <<MSG
[minidl] error: could not download $url (no network?).
With a local copy of $file, do one of:
  - set MINIDL_DATA_DIR to the folder that holds it; scripts/train.sh and
    scripts/get-data.sh then copy it from there:
      MINIDL_DATA_DIR=/path/to/folder scripts/train.sh
  - copy it to $dir/$file yourself, then run scripts/train.sh again.
(charlm train --data FILE alone trains with charlm's defaults, not the
script's recipe.)
MSG
    exit 1
  fi
fi
mv "$dir/$file.tmp" "$dir/$file"
echo "[minidl] $dir/$file: $(wc -c <"$dir/$file") bytes"
