#!/usr/bin/env bash
# Builds, here on the development machine, exactly what scripts/gpu-check.sh needs on a lent GPU
# machine (which has no Rust toolchain and no network), into .gpu/ (git-ignored), and prints the
# one device `run` call to make. See docs/gpu.md, "Next GPU session: the one prepared run".
#
#   scripts/gpu-prepare.sh          # build (release; ~20-40 min cold on 2 cores), strip, pack
#   scripts/gpu-prepare.sh --dry    # build nothing: say what would be built, list what is there
#
# Into .gpu/:
#   bins.tar.xz    dapt-worker (`cuda`), dapt-worker-autotune (`cuda-autotune`) and fused_gpu (the
#                  worker/tests/fused_gpu test executable, `cuda`), stripped and xz-packed; the run
#                  unpacks them with Python's tarfile (no xz binary needed there)
#   corpus/        a prepared corpus: $DAPT_CORPUS, else data/postgres-sotu, else data/quickstart
#                  (prepared here from examples/quickstart when missing)
#   autotune-cache.tgz  $AUTOTUNE_CACHE if given: the autotune results an earlier run returned
#   COMMIT, SIZES  the commit built (with -dirty when the tree had changes) and the sizes
#
# The tree that travels to the device (tracked files + .gpu, carried) must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = --dry ] && dry=1
limit=$((64 * 1024 * 1024))
G=.gpu
run() { if [ $dry = 1 ]; then echo "would run: $*"; else echo "+ $*"; "$@"; fi; }
size() { { du -sb "$@" 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

[ $dry = 1 ] || mkdir -p "$G/bin"

# --- binaries ------------------------------------------------------------------------------------
# The two worker builds share target/release: cargo keeps each feature set's artifacts apart, so
# building one after the other relinks rather than rebuilds.
build_worker() { # FEATURE NAME
  run cargo build --release --features "$1" -p dapt-worker
  run strip -o "$G/bin/$2" target/release/dapt-worker
}
build_worker cuda dapt-worker
build_worker cuda-autotune dapt-worker-autotune
if [ $dry = 1 ]; then
  echo "would run: cargo test --release --features cuda -p dapt-worker --test fused_gpu --no-run"
else
  exe=$(cargo test --release --features cuda -p dapt-worker --test fused_gpu --no-run \
    --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "fused_gpu" and m.get("executable"):
        print(m["executable"])')
  [ -n "$exe" ] || { echo "no fused_gpu test executable in cargo's output" >&2; exit 1; }
  run strip -o "$G/bin/fused_gpu" "$exe"
fi
if [ $dry = 0 ]; then
  rm -f "$G/bins.tar.xz"
  (cd "$G/bin" && XZ_OPT=-6 tar -cJf ../bins.tar.xz dapt-worker dapt-worker-autotune fused_gpu)
fi

# --- corpus --------------------------------------------------------------------------------------
corpus=${DAPT_CORPUS:-}
for c in data/postgres-sotu data/quickstart; do
  [ -z "$corpus" ] && [ -f "$c/manifest.json" ] && corpus=$c
done
if [ -z "$corpus" ]; then
  run cargo run -q -p dapt-coordinator --bin dapt -- prepare examples/quickstart/job.yaml
  corpus=data/quickstart
fi
if [ $dry = 1 ]; then
  echo "would copy corpus $corpus -> $G/corpus ($(mib "$(size "$corpus")"))"
else
  rm -rf "$G/corpus" && cp -r "$corpus" "$G/corpus" && rm -f "$G/corpus/.verified.json"
fi
if [ -n "${AUTOTUNE_CACHE:-}" ]; then run cp "$AUTOTUNE_CACHE" "$G/autotune-cache.tgz"; fi

# --- what travels --------------------------------------------------------------------------------
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
if [ $dry = 0 ]; then
  echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)" >"$G/COMMIT"
  {
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(cat "$G/COMMIT")"
    for f in "$G"/bin/*; do echo "$(basename "$f") stripped $(mib "$(size "$f")")"; done
    echo "bins.tar.xz $(mib "$(size "$G/bins.tar.xz")")"
    echo "corpus $(mib "$(size "$G/corpus")") ($corpus)"
  } >"$G/SIZES"
fi
travel=$((tracked + $(size "$G/bins.tar.xz" "$G/corpus" "$G/autotune-cache.tgz" "$G/COMMIT" "$G/SIZES")))
echo
[ -f "$G/SIZES" ] && cat "$G/SIZES"
for f in "$G"/bin/* "$G"/bins.tar.xz "$G"/corpus "$G"/autotune-cache.tgz; do
  [ -e "$f" ] && echo "  $f: $(mib "$(size "$f")")"
done
echo "tracked files $(mib "$tracked"); travels (tracked + carried .gpu without bin/): $(mib "$travel") of 64 MiB"
if [ "$travel" -gt "$limit" ]; then
  echo "TOO LARGE: the device call would be refused; use a smaller corpus (DAPT_CORPUS)" >&2
  exit 1
fi
# .gpu/bin holds the unpacked binaries here; they must not travel twice.
[ $dry = 1 ] || rm -rf "$G/bin"

cat <<'EOF'

The device call (the `run` tool), with timeout_s 570 and carry [".gpu"]:

python3 -c "import tarfile; tarfile.open('.gpu/bins.tar.xz').extractall('.gpu')" && BUDGET=480 bash scripts/gpu-check.sh 2>&1 | tee $OUT/console.log

Its files come back (at most 8): results.json, results.md, summary.log, logs.tgz,
autotune-cache.tgz, console.log. Commit results.json as docs/bench/h200-latest.json; copy
autotune-cache.tgz here as .gpu/autotune-cache.tgz (or AUTOTUNE_CACHE=... for this script) so
the next run starts tuned.
EOF
