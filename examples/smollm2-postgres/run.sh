#!/usr/bin/env bash
# Domain-adaptive continued pretraining of SmolLM2-135M on the PostgreSQL 15 manual, with 0%, 5%
# and 25% of general "replay" text (State of the Union addresses), end to end through dapt:
# fetch, import, `dapt launch` with 2 workers, `dapt eval` of the base model and of each export,
# and a plot of held-out perplexity against tokens trained. Results: docs/dapt-results.md.
#
#   examples/smollm2-postgres/run.sh [SHARE...]     (from the repository root; SHARE: 00 05 25)
#
# Needs the release binaries (`cargo build --release --bins`; DAPT=/path/to/dapt picks others,
# with their dapt-worker next to them) and what examples/fetch-*.sh need the first time.
# Writes under data/smollm2-postgres/:
#   corpus-replay-SS/, checkpoints-replay-SS/   each share's corpus, checkpoints and export/
#   replay-SS.log          the coordinator's JSON log (steps, held-out evaluations, commits)
#   replay-SS.time         start, end and wall seconds of the run
#   eval-base.json, eval-replay-SS.json          `dapt eval` of the base model and each export
#   curves.svg             held-out perplexity against tokens trained, every share
# A share whose export exists is skipped (delete its checkpoints-replay-SS/ to run it again); an
# interrupted run resumes from its last committed checkpoint when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/../.."

DAPT="${DAPT:-target/release/dapt}"
PLOT="${DAPT_PLOT:-target/release/dapt-plot}"
EX=examples/smollm2-postgres
OUT=data/smollm2-postgres
MODEL=data/models/smollm2-135m-hf
# The before/after table evaluates this many held-out tokens of each source (the in-training
# curve uses the job's smaller eval_tokens; both are the first windows of the same held-out sets).
EVAL_TOKENS="${EVAL_TOKENS:-16384}"
SEQ_LEN=256          # the jobs' training.seq_len
TOKENS_PER_STEP=1024 # the jobs' global_batch x seq_len, for the plot's x axis
if [ "$#" -gt 0 ]; then SHARES=("$@"); else SHARES=(00 05 25); fi

log() { printf '[smollm2-postgres] %s\n' "$*" >&2; }

[ -x "$DAPT" ] || { log "no $DAPT: run cargo build --release --bins (or set DAPT)"; exit 1; }
mkdir -p "$OUT"

# The corpora and the base model (each step skips what is already there).
examples/fetch-data.sh data/raw
examples/fetch-model.sh data/models >/dev/null
if [ ! -f "$MODEL/model.safetensors" ]; then
    "$DAPT" import-gguf data/models/smollm2-135m/*.gguf --out "$MODEL"
fi

# One share after the other: each run takes both cores.
for share in "${SHARES[@]}"; do
    job="$EX/replay-$share.yaml"
    [ -f "$job" ] || { log "no $job"; exit 1; }
    if [ -f "$OUT/checkpoints-replay-$share/export/model.safetensors" ]; then
        log "replay $share%: already trained (delete $OUT/checkpoints-replay-$share to redo)"
        continue
    fi
    log "replay $share%: dapt launch $job --workers 2 (log: $OUT/replay-$share.log)"
    start=$(date +%s)
    # --log-format json: one JSON object per line on stderr, which dapt-plot reads.
    "$DAPT" --log-format json launch "$job" --workers 2 2>>"$OUT/replay-$share.log"
    end=$(date +%s)
    printf 'start=%s end=%s wall_s=%s\n' "$(date -u -d "@$start" +%FT%TZ)" \
        "$(date -u -d "@$end" +%FT%TZ)" "$((end - start))" >"$OUT/replay-$share.time"
    log "replay $share%: done in $((end - start)) s"
done

# Before and after, through `dapt eval` (the in-training evaluation's code). The held-out
# documents, and so the evaluation windows, are the same in every share's corpus: the split
# depends only on each document's text and the held_out fraction, and weight 0 still holds out.
evaluate() { # MODEL_DIR CORPUS_DIR OUT_JSON
    [ -f "$3" ] || "$DAPT" eval "$1" "$2" --seq-len "$SEQ_LEN" --max-tokens "$EVAL_TOKENS" >"$3"
}
evaluate "$MODEL" "$OUT/corpus-replay-${SHARES[0]}" "$OUT/eval-base.json"
for share in "${SHARES[@]}"; do
    evaluate "$OUT/checkpoints-replay-$share/export" "$OUT/corpus-replay-$share" \
        "$OUT/eval-replay-$share.json"
done

# The curves: domain and general held-out perplexity against tokens trained; the dashed lines are
# the goal (domain 20% below the base model, general at most 5% above it).
[ -x "$PLOT" ] || cargo build --release -p dapt-plot
runs=()
for share in "${SHARES[@]}"; do runs+=("$((10#$share))% replay=$OUT/replay-$share.log"); done
"$PLOT" --tokens-per-step "$TOKENS_PER_STEP" --out "$OUT/curves.svg" \
    --guide postgres=0.8 --guide sotu=1.05 "${runs[@]}"

python3 - "$OUT" "${SHARES[@]}" <<'EOF'
# The before/after table from the dapt eval outputs.
import json, sys
out, shares = sys.argv[1], sys.argv[2:]
base = {r["source"]: r for r in json.load(open(f"{out}/eval-base.json"))}
print("\n| model | postgres (domain) ppl | vs base | sotu (general) ppl | vs base |")
print("|---|---:|---:|---:|---:|")
print(f"| base | {base['postgres']['perplexity']:.2f} | | {base['sotu']['perplexity']:.2f} | |")
for s in shares:
    r = {x["source"]: x for x in json.load(open(f"{out}/eval-replay-{s}.json"))}
    d, g = r["postgres"]["perplexity"], r["sotu"]["perplexity"]
    bd, bg = base["postgres"]["perplexity"], base["sotu"]["perplexity"]
    print(f"| {int(s)}% replay | {d:.2f} | {100 * (d / bd - 1):+.1f}% | {g:.2f} | {100 * (g / bg - 1):+.1f}% |")
print(f"\n({base['postgres']['tokens']} and {base['sotu']['tokens']} held-out tokens)")
EOF
