#!/usr/bin/env bash
# Fetches tiny shakespeare into DIR (default: data/). With MINIDL_DATA_DIR set,
# copies it from there instead of downloading (offline machines, CI).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-data}
file=tinyshakespeare.txt
url=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
mkdir -p "$dir"
if [ -s "$dir/$file" ]; then
  echo "[minidl] $dir/$file already present"
  exit 0
fi
if [ -n "${MINIDL_DATA_DIR:-}" ]; then
  src="$MINIDL_DATA_DIR/$file"
  [ -s "$src" ] || { echo "[minidl] error: MINIDL_DATA_DIR=$MINIDL_DATA_DIR has no $file" >&2; exit 1; }
  cp "$src" "$dir/$file.tmp"
else
  echo "[minidl] downloading $url"
  if command -v curl >/dev/null 2>&1; then curl -fsSL "$url" -o "$dir/$file.tmp"
  else wget -q "$url" -O "$dir/$file.tmp"; fi
fi
mv "$dir/$file.tmp" "$dir/$file"
echo "[minidl] $dir/$file: $(wc -c <"$dir/$file") bytes"
