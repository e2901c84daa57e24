#!/usr/bin/env bash
# GPU check and benchmark for dapt, run from the repository root on a machine with an NVIDIA GPU,
# CUDA (driver, NVRTC, headers), NCCL and PyTorch + transformers, but no Rust toolchain: bring a
# `dapt-worker` built here with `cargo build --release --features cuda -p dapt-worker`, and
# `dapt` (`cargo build --release -p dapt-coordinator`) for the `dapt launch` runs.
#
#   scripts/gpu-check.sh            # everything: probe, 1B and SmolLM2-135M shapes, dapt and PyTorch
#
# Environment (all optional):
#   DAPT_WORKER  the cuda build of dapt-worker (default: .gpu/dapt-worker, then target/release/)
#   DAPT         the dapt command, next to DAPT_WORKER (default: .gpu/dapt, then target/release/);
#                without it the `dapt launch` runs are skipped
#   DAPT_CORPUS  a prepared corpus (`dapt prepare`; default: .gpu/corpus, then data/postgres-sotu)
#   OUT          where logs and results.json go (default: out/gpu-check)
#   WORK         scratch space for the generated models and jobs (default: /tmp/dapt-gpu)
#   BUDGET       seconds for the whole script; steps that would not fit are skipped (default 360)
#   SHAPES       which model shapes, in order (default: "1b 135m")
#   TORCH_SHAPES the shapes that also run the PyTorch anchor (default: all of SHAPES)
#   STEPS_1B, STEPS_135M  dapt training steps per shape (default 12 and 20)
#
# For each shape it writes a Hugging Face directory with random weights (the same shape as
# Llama 3.2 1B / SmolLM2-135M; no pretrained weights are needed to measure throughput), trains it
# with `dapt-worker train --device cuda` (device-resident f32 master weights and AdamW, NCCL
# all-reduce through a one-rank communicator; then again with bf16 compute), and trains the same
# shape and batch with PyTorch eager (bf16 autocast, and TF32) as the anchor. tokens/s is the mean over
# the steps after the first three (kernel compilation and autotuning); MFU counts 6N + 12 L d s
# FLOPs per token against a 790 TFLOP/s bf16 ceiling; memory is the peak of nvidia-smi's
# memory.used during the run. Then the same job through `dapt launch --workers 1 --device cuda
# --precision bf16` (coordinator, worker agent, one rank; its step lines are the coordinator's).
set -uo pipefail
export PYTHONUNBUFFERED=1
started=$SECONDS
BUDGET=${BUDGET:-360}
OUT=${OUT:-out/gpu-check}
WORK=${WORK:-/tmp/dapt-gpu}
SHAPES=${SHAPES:-"1b 135m"}
TORCH_SHAPES=${TORCH_SHAPES:-$SHAPES}
mkdir -p "$OUT" "$WORK"
here=$(cd "$(dirname "$0")" && pwd)
ANCHOR=$here/gpu_anchor.py
[ -f "$ANCHOR" ] || ANCHOR=scripts/gpu_anchor.py
pick() { for p in "$@"; do [ -e "$p" ] && { echo "$p"; return; }; done; }
WORKER=${DAPT_WORKER:-$(pick .gpu/dapt-worker target/release/dapt-worker)}
CORPUS=${DAPT_CORPUS:-$(pick .gpu/corpus data/postgres-sotu)}
DAPT=${DAPT:-$(pick .gpu/dapt target/release/dapt)}
PY=${PYTHON:-python3}
left() { echo $((BUDGET - (SECONDS - started))); }
log() { echo "[gpu-check +$((SECONDS - started))s] $*" | tee -a "$OUT/summary.log"; }

# --- probe -------------------------------------------------------------------------------------
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -2
  $PY -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/probe.log"
SITE=$($PY -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
for d in "${CUDA_PATH:-}" /usr/local/cuda "$SITE/nvidia/cu13" "$SITE/nvidia/cuda_runtime"; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_PATH=$d; break; fi
done
libdirs=$(ls -d /usr/local/cuda/lib64 "$SITE"/nvidia/cu13/lib "$SITE"/nvidia/cuda_nvrtc/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH=${libdirs}${LD_LIBRARY_PATH:-}
{
  echo "CUDA_PATH=${CUDA_PATH:-unset} (cccl: $(ls -d "${CUDA_PATH:-/nonexistent}"/include/cccl 2>/dev/null || echo none))"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "nvrtc: $(ls /usr/local/cuda/lib64/libnvrtc.so* "$SITE"/nvidia/cu13/lib/libnvrtc.so* 2>/dev/null | tr '\n' ' ')"
  echo "nccl (dapt finds it itself): $(ls "$SITE"/nvidia/nccl/lib/libnccl.so* 2>/dev/null)"
  echo "worker: $WORKER  corpus: $CORPUS"
} 2>&1 | tee -a "$OUT/probe.log"
if [ -z "$WORKER" ] || [ -z "$CORPUS" ]; then
  log "no dapt-worker cuda build or no prepared corpus: see the header of this script"; exit 2
fi
chmod +x "$WORKER" 2>/dev/null

# --- helpers -----------------------------------------------------------------------------------
# mem_watch NAME: samples GPU memory in the background until mem_stop.
mem_watch() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$OUT/mem-$1.csv" 2>/dev/null &
  MEM_PID=$!
}
mem_stop() { kill "$MEM_PID" 2>/dev/null; wait "$MEM_PID" 2>/dev/null; }

# step NAME SECONDS CMD...: runs CMD under `timeout` if that many seconds are left.
step() {
  local name=$1 secs=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 30 ]; then log "skip $name: ${l}s left"; return 1; fi
  [ "$secs" -gt "$l" ] && secs=$l
  log "start $name (timeout ${secs}s)"
  mem_watch "$name"
  timeout --kill-after=5 "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  mem_stop
  log "end $name rc=$rc"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}

# job SHAPE SEQ GLOBAL MICRO STEPS: a job file training $WORK/hf-SHAPE on the corpus.
job() {
  local shape=$1 seq=$2 global=$3 micro=$4 steps=$5
  cat >"$WORK/job-$shape.yaml" <<EOF
job: gpu-$shape
seed: 1
model:
  hf: $WORK/hf-$shape
corpus:
  output: $(realpath "$CORPUS")
  sources:
    - name: postgres
      role: domain
      paths: ["unused"]
      weight: 3
training:
  seq_len: $seq
  global_batch: $global
  micro_batch: $micro
  tokens: $((seq * global * steps))
  optimizer:
    lr: 3.0e-4
  eval_tokens: 4096
checkpoint:
  dir: $WORK/ckpt-$shape
  every: 1000000
EOF
  echo "$WORK/job-$shape.yaml"
}

# --- per shape ---------------------------------------------------------------------------------
for shape in $SHAPES; do
  case $shape in
    1b) seq=1024 global=16 micro=4 steps=${STEPS_1B:-12} ;;
    135m) seq=1024 global=16 micro=8 steps=${STEPS_135M:-20} ;;
    *) seq=128 global=8 micro=4 steps=6 ;;
  esac
  step "hf-$shape" 120 $PY "$ANCHOR" --shape "$shape" --seq-len $seq --write-hf "$WORK/hf-$shape" || continue
  jobfile=$(job "$shape" $seq $global $micro $steps)
  step "dapt-$shape-f32" 150 "$WORKER" --log-format json train "$jobfile" --device cuda --nccl --no-checkpoints
  torch=0; [[ " $TORCH_SHAPES " == *" $shape "* ]] && torch=1
  [ $torch = 1 ] && step "torch-$shape-bf16" 90 $PY "$ANCHOR" --shape "$shape" --seq-len $seq --global-batch $global \
    --micro-batch $micro --steps 8 --precision bf16
  step "dapt-$shape-bf16" 120 "$WORKER" --log-format json train "$jobfile" --device cuda \
    --precision bf16 --no-checkpoints
  [ $torch = 1 ] && step "torch-$shape-tf32" 90 $PY "$ANCHOR" --shape "$shape" --seq-len $seq --global-batch $global \
    --micro-batch $micro --steps 5 --precision tf32
  # The product path: dapt launch, the worker agent, one rank (it writes one checkpoint at the end).
  if [ -n "$DAPT" ] && [ -x "$DAPT" ] && [ "$(dirname "$(realpath "$DAPT")")" = "$(dirname "$(realpath "$WORKER")")" ]; then
    rm -rf "$WORK/ckpt-$shape"
    step "launch-$shape-bf16" 150 "$DAPT" --log-format json launch "$jobfile" --workers 1 --device cuda \
      --precision bf16 --no-export
    cp "$WORK/ckpt-$shape/logs/worker-0.log" "$OUT/launch-$shape-bf16.worker.log" 2>/dev/null
  else
    log "skip launch-$shape-bf16: no dapt next to $WORKER"
  fi
done

# --- results -----------------------------------------------------------------------------------
$PY - "$OUT" "$ANCHOR" <<'EOF' | tee "$OUT/results.md"
import glob, json, os, re, subprocess, sys
out, anchor = sys.argv[1], sys.argv[2]
def mem_gib(name):
    try:
        vals = [int(x) for x in open(f"{out}/mem-{name}.csv").read().split() if x.strip().isdigit()]
        return max(vals) / 1024 if vals else None
    except OSError:
        return None
rows = []
for path in sorted(glob.glob(f"{out}/dapt-*.log") + glob.glob(f"{out}/launch-*-*[0-9a-z].log")):
    if path.endswith(".worker.log"):
        continue
    name = os.path.basename(path)[:-4]
    _, shape, prec = name.split("-")
    steps, phases = [], []
    for line in open(path, errors="replace"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        f = rec.get("fields", rec)
        if f.get("message") == "step" and "tokens_per_s" in f:
            steps.append((float(f["tokens_per_s"]), float(f.get("loss", "nan"))))
        if f.get("message") == "step phases":
            phases.append([float(f[k]) for k in ("forward_backward_s", "all_reduce_s", "clip_adamw_s")])
    if not steps:
        rows.append(dict(name=name, shape=shape, precision=prec, error="no step finished"))
        continue
    timed = steps[3:] if len(steps) > 4 else steps[1:] or steps
    tps = len(timed) / sum(1 / t for t, _ in timed)  # tokens/s over the timed steps' total time
    meta = json.loads(subprocess.run([sys.executable, anchor, "--shape", shape, "--flops-per-token"],
                                     capture_output=True, text=True).stdout)
    tp = phases[3:] if len(phases) > 4 else phases[1:] or phases
    split = [sum(p[i] for p in tp) / len(tp) for i in range(3)] if tp else None
    rows.append(dict(name=name, shape=shape, precision=prec, steps=len(steps), tokens_per_s=tps,
                     mfu=tps * meta["flops_per_token"] / 790e12, first_loss=steps[0][1],
                     last_loss=steps[-1][1], peak_gib=mem_gib(name), first_step_tps=steps[0][0],
                     phases_s=split))
for path in sorted(glob.glob(f"{out}/torch-*.log")):
    name = os.path.basename(path)[:-4]
    recs = [json.loads(l) for l in open(path, errors="replace") if l.startswith("{")]
    if not recs:
        rows.append(dict(name=name, error="no result"))
        continue
    r = recs[-1]
    rows.append(dict(name=name, shape=r["shape"], precision=r["precision"], steps=r["steps"],
                     tokens_per_s=r["tokens_per_s"], mfu=r["mfu"], last_loss=r["loss"],
                     peak_gib=mem_gib(name), torch_reserved_gib=r.get("max_reserved_gib")))
json.dump(rows, open(f"{out}/results.json", "w"), indent=1)
print("| run | tokens/s | MFU | peak GPU mem (GiB, nvidia-smi) | steps | loss first -> last |")
print("|---|---:|---:|---:|---:|---|")
for r in rows:
    if "error" in r:
        print(f"| {r['name']} | {r['error']} | | | | |")
        continue
    mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "?"
    first = f"{r['first_loss']:.3f} -> " if "first_loss" in r else ""
    print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {mem} | {r['steps']} | {first}{r['last_loss']:.3f} |")
for r in rows:
    if r.get("phases_s"):
        fb, ar, ad = r["phases_s"]
        print(f"\n{r['name']}: per step {fb:.3f} s forward/backward, {ar:.4f} s NCCL all-reduce, {ad:.4f} s clip + AdamW; first step {r['first_step_tps']:,.0f} tokens/s", end="")
print()
by = {r["name"]: r for r in rows if "error" not in r}
for shape in ("1b", "135m"):
    for run, dp in (("dapt", "f32"), ("dapt", "bf16"), ("launch", "bf16")):
        d = by.get(f"{run}-{shape}-{dp}")
        for tp in ("bf16", "tf32"):
            t = by.get(f"torch-{shape}-{tp}")
            if d and t:
                print(f"\n{shape}: {run} {dp} / PyTorch eager {tp} = {d['tokens_per_s'] / t['tokens_per_s']:.3f}x", end="")
print()
EOF
log "done in $((SECONDS - started))s"
