#!/usr/bin/env bash
# GPU check and benchmark for dapt: ONE prepared run on a machine with an NVIDIA GPU, CUDA (driver,
# NVRTC, headers) and PyTorch + transformers, but no Rust toolchain. Everything it runs is built
# on the development machine by scripts/gpu-prepare.sh into .gpu/ (see docs/gpu.md, "Next GPU
# session"), and it fits one device call: steps that would overrun BUDGET are skipped, in the
# order below, most important first.
#
#   scripts/gpu-check.sh            # from the repository root on the GPU machine
#
# What it answers, in order (per shape: 1B, then 135M):
#   1. fused_gpu   the fused ops' CubeCL kernels on CUDA against the CPU reference (the test binary
#                  worker/tests/fused_gpu, built with --features cuda): pass/fail per test; then
#                  each DAPT_MATMUL strategy timed against Burn's matmul on the 1B step's matmuls.
#   2. measure     dapt bf16 with fixed kernels (the `cuda` build) and PyTorch eager bf16 on the SAME
#                  initial weights and the SAME token windows (`dapt-worker batches`), constant LR on
#                  both sides: tokens/s, MFU against 790 TFLOP/s, peak memory, every step's loss on
#                  each side (the loss parity), the first step's time (NVRTC compilation); for
#                  135M, a restart of the same build (the PTX cache: no compilation the second time).
#   3. profile     (1B) 2 steps under CubeCL's profiler: per-kernel device time, summed and set
#                  against the unprofiled step time (kernel-bound or host/launch-bound?), top kernels.
#   4. autotune    dapt bf16 with the `cuda-autotune` build, with the time left after reserving ~90 s
#                  per shape still to measure: the first step tunes (the one-off cost), the later
#                  steps run tuned; CubeCL's log of the variant chosen per key. The results come back
#                  in $OUT/autotune-cache.tgz: carry it as .gpu/autotune-cache.tgz and the next run
#                  starts tuned.
#   5. results     $OUT/results.json (commit as docs/bench/h200-latest.json), results.md, summary.log
#                  and logs.tgz (every log: a device call returns at most 8 files).
#
# Environment (all optional):
#   DAPT_WORKER           the `cuda` build (default .gpu/dapt-worker, then target/release/)
#   DAPT_WORKER_AUTOTUNE  the `cuda-autotune` build (default .gpu/dapt-worker-autotune); absent: no 4.
#   FUSED_GPU             the fused_gpu test executable (default .gpu/fused_gpu); absent: no 1.
#   DAPT_CORPUS           a prepared corpus (default .gpu/corpus, then data/quickstart)
#   OUT                   where the results go (default out/gpu-check); at most 8 files come back
#                         from a device call, so the logs are packed into $OUT/logs.tgz
#   WORK                  scratch: models, jobs, logs, kernel caches (default /tmp/dapt-gpu)
#   BUDGET                seconds for the whole script (default 480; call it with timeout_s 570)
#   SHAPES                model shapes, in order (default "1b 135m")
#   STEPS_1B, STEPS_135M  dapt steps per shape (default 10 and 12); PyTorch runs 3 + 7 / 3 + 9
#   RESTART_SHAPES        shapes whose dapt run is repeated for 4 steps, to see the PTX cache spare
#                         the restart its compilation (default "135m"; "" for none)
#   ZERO_SHAPES           shapes run 4 steps at zero_stage 2 through a one-rank NCCL communicator
#                         (the device engine's bucket reduces and all-gather; default "135m"; "" for none)
#   KERNELS_SHAPES        shapes run 7 steps with DAPT_ATTENTION=kernels (the unit-level flash
#                         attention kernels instead of the default, blockwise Burn matmuls on the
#                         tensor cores; default "1b"; "" for none)
#   MATMUL_STRATEGIES     DAPT_MATMUL strategies timed against Burn's matmul after 1 (default: cuBLAS
#                         and cubek's tensor-core ones, below; "" for none), MATMUL_TIMEOUT s each (40), then
#                         30 s of its checks against the CPU
#   MATMUL_SHAPES         shapes run 7 steps with the fastest of them, if one beats Burn's (default "1b")
#   ONEBLOCK_SHAPES       shapes run 7 steps with blockwise attention in one block of the whole
#                         sequence (DAPT_ATTENTION_BLOCK=SEQ; the default blocks are sized for 128
#                         MiB of scores: 4 at 1b), with the chosen matmul; last, if time is left
#                         (default "1b"; "" for none)
#   NCU=1                 after 3, Nsight Compute on 30 kernels of one 1B step (NCU_SKIP launches first)
#   TIMING=0              skip the attention timings after 1
#   PROFILE=0             skip 3;  AUTOTUNE=0: skip 4;  F32=1: also dapt f32 (TF32);  LAUNCH=1:
#                         also `dapt launch --workers 1` per shape (needs DAPT, the `dapt` binary)
#   AUTOTUNE_LEVEL        CubeCL's autotune level for 4 (minimal | balanced | extensive | full; default
#                         balanced): how coarsely shapes are bucketed into keys, not how many variants
#
# tokens/s is the mean over the steps after the first three (kernel compilation, autotuning);
# MFU counts 6N + 12 L d s FLOPs per token against 790 TFLOP/s; memory is the peak of
# nvidia-smi's memory.used during the run (PyTorch's own max_memory_reserved beside it).
set -uo pipefail
export PYTHONUNBUFFERED=1
started=$SECONDS
BUDGET=${BUDGET:-480}
OUT=${OUT:-out/gpu-check}
WORK=${WORK:-/tmp/dapt-gpu}
SHAPES=${SHAPES:-"1b 135m"}
MATMUL_STRATEGIES=${MATMUL_STRATEGIES-"cublas double-tma-mma specialized-tma-mma simple-tma-mma double-cyclic-mma ordered-double-mma specialized-cyclic-mma double-cyclic-mma-specialized double-cyclic-cmma simple-cyclic-mma"}
LOGS=$WORK/logs
mkdir -p "$OUT" "$WORK" "$LOGS"
OUT=$(realpath "$OUT") WORK=$(realpath "$WORK") LOGS=$(realpath "$LOGS")
here=$(cd "$(dirname "$0")" && pwd)
ANCHOR=$here/gpu_anchor.py
RESULTS=$here/gpu_results.py
pick() { for p in "$@"; do [ -e "$p" ] && { realpath "$p"; return; }; done; }
WORKER=${DAPT_WORKER:-$(pick .gpu/dapt-worker target/release/dapt-worker)}
WORKER_AT=${DAPT_WORKER_AUTOTUNE:-$(pick .gpu/dapt-worker-autotune)}
FUSED=${FUSED_GPU:-$(pick .gpu/fused_gpu)}
CORPUS=${DAPT_CORPUS:-$(pick .gpu/corpus data/quickstart)}
DAPT=${DAPT:-$(pick .gpu/dapt target/release/dapt)}
PY=${PYTHON:-python3}
[ -n "$CORPUS" ] && CORPUS=$(realpath "$CORPUS")
# The kernel caches (PTX per build, autotune results per GPU model): see worker/src/kernel_cache.rs.
export DAPT_KERNEL_CACHE=${DAPT_KERNEL_CACHE:-$WORK/kernels}
left() { echo $((BUDGET - (SECONDS - started))); }
log() { echo "[gpu-check +$((SECONDS - started))s] $*" | tee -a "$LOGS/summary.log"; }
skip() { log "skip $1: $2"; echo "$1: $2" >>"$LOGS/skipped.txt"; }

# --- probe -------------------------------------------------------------------------------------
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -2
  $PY -c 'import torch, transformers; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), "transformers", transformers.__version__)'
  for t in ncu nsys compute-sanitizer; do echo "$t: $(command -v $t || echo none)"; done
} 2>&1 | tee "$LOGS/probe.log"
SITE=$($PY -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
for d in "${CUDA_PATH:-}" /usr/local/cuda "$SITE/nvidia/cu13" "$SITE/nvidia/cuda_runtime"; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_PATH=$d; break; fi
done
# NVRTC for cubecl; cuBLAS (DAPT_MATMUL=cublas) from PyTorch's wheels (cu13: nvidia/cu13/lib; cu12:
# nvidia/cublas/lib).
libdirs=$(ls -d /usr/local/cuda/lib64 "$SITE"/nvidia/cu13/lib "$SITE"/nvidia/cuda_nvrtc/lib "$SITE"/nvidia/cublas/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH=${libdirs}${LD_LIBRARY_PATH:-}
{
  echo "CUDA_PATH=${CUDA_PATH:-unset} (cccl: $(ls -d "${CUDA_PATH:-/nonexistent}"/include/cccl 2>/dev/null || echo none))"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "cublas: $(ls "$SITE"/nvidia/*/lib/libcublas.so* /usr/local/cuda/lib64/libcublas.so* 2>/dev/null | tr '\n' ' ')"
  echo "worker: ${WORKER:-none}  autotune worker: ${WORKER_AT:-none}  fused_gpu: ${FUSED:-none}"
  echo "corpus: ${CORPUS:-none}  kernel cache: $DAPT_KERNEL_CACHE"
  echo "commit: $(cat .gpu/COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee -a "$LOGS/probe.log"
if [ -z "$WORKER" ] || [ -z "$CORPUS" ]; then
  log "no dapt-worker cuda build or no prepared corpus: run scripts/gpu-prepare.sh first"
  exit 2
fi
chmod +x "$WORKER" ${WORKER_AT:+"$WORKER_AT"} ${FUSED:+"$FUSED"} 2>/dev/null
# Autotune results of an earlier run (carried back as .gpu/autotune-cache.tgz): start tuned.
if [ -f .gpu/autotune-cache.tgz ]; then
  mkdir -p "$DAPT_KERNEL_CACHE" && tar -xzf .gpu/autotune-cache.tgz -C "$DAPT_KERNEL_CACHE" &&
    log "autotune results of an earlier run unpacked into $DAPT_KERNEL_CACHE"
fi

# --- helpers -----------------------------------------------------------------------------------
mem_watch() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$LOGS/mem-$1.csv" 2>/dev/null &
  MEM_PID=$!
}
mem_stop() { kill "$MEM_PID" 2>/dev/null; wait "$MEM_PID" 2>/dev/null; }

# step NAME SECONDS CMD...: runs CMD under `timeout` if at least 30 s are left (its log:
# $LOGS/NAME.log); SECONDS is capped by what is left.
step() {
  local name=$1 secs=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 30 ]; then skip "$name" "${l}s of the budget left"; return 1; fi
  [ "$secs" -gt "$l" ] && secs=$l
  log "start $name (timeout ${secs}s)"
  mem_watch "$name"
  timeout --kill-after=5 "$secs" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  mem_stop
  log "end $name rc=$rc"
  echo "$rc" >"$LOGS/$name.rc"
  tail -n 3 "$LOGS/$name.log" | cut -c1-300 | sed 's/^/    /'
  return $rc
}

# job SHAPE SEQ GLOBAL MICRO STEPS: a job training $WORK/hf-SHAPE on the corpus at a constant LR
# (no warm-up, no decay: the PyTorch anchor's schedule, for the loss parity).
job() {
  local shape=$1 seq=$2 global=$3 micro=$4 steps=$5
  cat >"$WORK/job-$shape.yaml" <<EOF
job: gpu-$shape
seed: 1
model:
  hf: $WORK/hf-$shape
corpus:
  output: $CORPUS
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
  schedule:
    kind: linear
    warmup: 0.0
    min_lr_ratio: 1.0
  eval_tokens: 4096
checkpoint:
  dir: $WORK/ckpt-$shape
  every: 1000000
EOF
  echo "$WORK/job-$shape.yaml"
}

shape_args() {
  case $1 in
    1b) seq=1024 global=16 micro=4 steps=${STEPS_1B:-10} tsteps=7 ;;
    135m) seq=1024 global=16 micro=8 steps=${STEPS_135M:-12} tsteps=9 ;;
    *) seq=128 global=8 micro=4 steps=6 tsteps=3 ;;
  esac
}

# --- 1. fused kernels on CUDA ------------------------------------------------------------------
if [ -n "$FUSED" ]; then
  # --include-ignored: also the whole-model check with flash attention (ignored on lavapipe only
  # because it is slow there). The timings run after, one test at a time, on an idle GPU.
  step fused_gpu 120 "$FUSED" --test-threads=4 --include-ignored --nocapture --skip gpu_speed
  # Kernels vs decomposed, kernels vs blockwise attention (head dims 64 and 128): which one
  # DAPT_ATTENTION's auto default should take (docs/gpu.md).
  if [ "${TIMING:-1}" = 1 ]; then
    step fused_gpu_timing 90 "$FUSED" --test-threads=1 --include-ignored --nocapture gpu_speed \
      --skip gpu_speed_of_matmul
  fi
else
  skip fused_gpu "no .gpu/fused_gpu (scripts/gpu-prepare.sh builds it)"
fi

# --- 1b. matmul strategies -----------------------------------------------------------------------
# Each DAPT_MATMUL strategy against Burn's own matmul on the 1B step's matmul problems, and its
# checks against the CPU, one process per strategy (a kernel that fails to compile may take its
# process with it); the fastest one with no wrong result and every check passed, if it beats
# Burn's by 3%, trains the 1B shape below (matmul-1b-bf16).
BEST_MATMUL=burn
if [ -n "$FUSED" ] && [ -n "$MATMUL_STRATEGIES" ]; then
  rm -f "$LOGS"/mmbench-* "$LOGS"/mmcheck-*  # a warm machine's earlier run
  for s in $MATMUL_STRATEGIES; do
    # Keep ~240 s for the 1B measurements after (hf-1b, dapt, PyTorch, the chosen strategy).
    if [ "$(left)" -lt $((240 + ${MATMUL_TIMEOUT:-40} + 30)) ]; then
      skip "mmbench-$s" "$(left)s left, 240 s kept for the 1B runs"; continue
    fi
    step "mmbench-$s" "${MATMUL_TIMEOUT:-40}" env DAPT_MATMUL="$s" "$FUSED" --exact \
      matmul::gpu_speed_of_matmul_strategies --include-ignored --nocapture
    grep -h "^matmul_step" "$LOGS/mmbench-$s.log" 2>/dev/null | sed 's/^/    /'
    # The strategy's checks against the CPU (odd sizes in every layout, the projection's node
    # both ways); a failed one (rc != 0) rules it out. Only for a strategy whose timing ran.
    if grep -q "^matmul_step" "$LOGS/mmbench-$s.log" 2>/dev/null; then
      step "mmcheck-$s" 30 env DAPT_MATMUL="$s" "$FUSED" matmul:: --skip gpu_speed \
        --nocapture --test-threads=1
    fi
  done
  BEST_MATMUL=$($PY "$RESULTS" --logs "$LOGS" --best-matmul 2>>"$LOGS/summary.log" || echo burn)
  log "fastest DAPT_MATMUL: $BEST_MATMUL"
fi

# --- 2-4, per shape -------------------------------------------------------------------------------
# measure SHAPE: dapt bf16 (fixed kernels) and PyTorch eager bf16 on the same weights and data.
measure() {
  local shape=$1 jobfile
  shape_args "$shape"
  # Written once per machine (a second call on a warm machine reuses it).
  if [ ! -f "$WORK/hf-$shape/config.json" ]; then
    step "hf-$shape" 90 $PY "$ANCHOR" --shape "$shape" --seq-len $seq --write-hf "$WORK/hf-$shape" || return 1
  fi
  jobfile=$(job "$shape" $seq $global $micro $steps)
  rm -f "$WORK/batches-$shape.u32"
  step "batches-$shape" 30 "$WORKER" batches "$jobfile" --steps $((3 + tsteps)) --out "$WORK/batches-$shape.u32"
  step "dapt-$shape-bf16" 120 "$WORKER" --log-format json train "$jobfile" --device cuda \
    --precision bf16 --no-checkpoints
  local same=()
  [ -f "$WORK/batches-$shape.u32" ] && same=(--hf "$WORK/hf-$shape" --batches "$WORK/batches-$shape.u32")
  step "torch-$shape-bf16" 90 $PY "$ANCHOR" --shape "$shape" --seq-len $seq --global-batch $global \
    --micro-batch $micro --warmup 3 --steps $tsteps --precision bf16 ${same[@]+"${same[@]}"}
  # A restart of the same build: its kernels come from the PTX cache, so its first step should
  # take no longer than the others (the cold run's first step compiled them).
  if [[ " ${RESTART_SHAPES-135m} " == *" $shape "* ]]; then
    step "restart-$shape-bf16" 60 "$WORKER" --log-format json train "$jobfile" --device cuda \
      --precision bf16 --no-checkpoints --stop-after 4
  fi
  # ZeRO stage 2 through a one-rank NCCL communicator (docs/gpu.md, "ZeRO on GPUs"): the device
  # engine's ncclReduceScatter / ncclAllGather path; its losses should equal the stage-0 run's
  # first steps (the dapt-$shape-bf16 log).
  if [[ " ${ZERO_SHAPES-135m} " == *" $shape "* ]]; then
    sed 's/^training:$/training:\n  zero_stage: 2/' "$jobfile" >"$WORK/job-$shape-zero2.yaml"
    step "zero2-$shape-bf16" 60 "$WORKER" --log-format json train "$WORK/job-$shape-zero2.yaml" \
      --device cuda --nccl --precision bf16 --no-checkpoints --stop-after 4
  fi
  # Attention by the unit-level kernels instead of the default, blockwise Burn matmuls on the
  # tensor cores (fused/blockwise.rs): the same job, whose tokens/s and losses sit beside
  # dapt-$shape-bf16's.
  if [[ " ${KERNELS_SHAPES-1b} " == *" $shape "* ]]; then
    step "kernels-$shape-bf16" 90 env DAPT_ATTENTION=kernels "$WORKER" --log-format json train \
      "$jobfile" --device cuda --precision bf16 --no-checkpoints --stop-after 7
  fi
  # The model with the fastest matmul strategy of 1b (the same job and data as dapt-$shape-bf16).
  if [[ " ${MATMUL_SHAPES-1b} " == *" $shape "* ]] && [ "$BEST_MATMUL" != burn ]; then
    step "matmul-$shape-bf16" 90 env DAPT_MATMUL="$BEST_MATMUL" "$WORKER" --log-format json train \
      "$jobfile" --device cuda --precision bf16 --no-checkpoints --stop-after 7
  fi
  # Blockwise attention in one block (fewer launches, copies and casts; the masked upper
  # triangle computed): beside matmul-$shape-bf16 when a strategy was chosen, else dapt-$shape-bf16.
  if [[ " ${ONEBLOCK_SHAPES-1b} " == *" $shape "* ]]; then
    step "oneblock-$shape-bf16" 90 env DAPT_MATMUL="$BEST_MATMUL" DAPT_ATTENTION_BLOCK=$seq \
      "$WORKER" --log-format json train "$jobfile" --device cuda --precision bf16 --no-checkpoints \
      --stop-after 7
  fi
  if [ "${F32:-0}" = 1 ]; then
    step "dapt-$shape-f32" 150 "$WORKER" --log-format json train "$jobfile" --device cuda --nccl --no-checkpoints
  fi
  if [ "${LAUNCH:-0}" = 1 ] && [ -n "$DAPT" ] && [ "$(dirname "$DAPT")" = "$(dirname "$WORKER")" ]; then
    rm -rf "$WORK/ckpt-$shape"
    step "launch-$shape-bf16" 150 "$DAPT" --log-format json launch "$jobfile" --workers 1 --device cuda \
      --precision bf16 --no-export
    cp "$WORK/ckpt-$shape/logs/worker-0.log" "$LOGS/launch-$shape-bf16.worker.log" 2>/dev/null
  fi
  return 0
}

# profile SHAPE: 2 steps under CubeCL's profiler (level basic: one line per kernel launch with its
# device time), through a cubecl.toml in the working directory, which dapt-worker keeps (it sets
# only the cache folders). The fixed build's PTX is cached by then: no compilation in the log.
profile() {
  local shape=$1
  mkdir -p "$WORK/prof"
  printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\nappend = false\n' \
    "$LOGS/profile-$shape-bf16.kernels.log" >"$WORK/prof/cubecl.toml"
  (cd "$WORK/prof" && step "profile-$shape-bf16" 90 "$WORKER" --log-format json train \
    "$WORK/job-$shape.yaml" --device cuda --precision bf16 --no-checkpoints --stop-after 2)
}

# ncu SHAPE (opt-in, NCU=1): Nsight Compute's speed-of-light and compute sections for 30 kernels of
# one step (after skipping NCU_SKIP launches: model upload and the first layers), on the machine's
# clocks (--clock-control none: the card's settings are left alone). Which matmul kernels reach
# the tensor cores, and how far each is from the memory or compute ceiling.
ncu_kernels() {
  local shape=$1
  command -v ncu >/dev/null || { skip "ncu-$shape" "no ncu on this machine"; return; }
  step "ncu-$shape-bf16" 120 ncu --clock-control none --launch-skip "${NCU_SKIP:-1500}" --launch-count 30 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis "$WORKER" train "$WORK/job-$shape.yaml" \
    --device cuda --precision bf16 --no-checkpoints --stop-after 1
}

# autotune SHAPE RESERVE: the cuda-autotune build, with what is left after RESERVE seconds (at most
# 240 s); its first step tunes, the later ones run tuned. CubeCL's autotune log (a cubecl.toml in
# the working directory) names the variant it chose per matmul and reduction key: the fixed
# strategies to pin if autotune itself is not kept.
autotune() {
  local shape=$1 reserve=$2 l secs
  l=$(left); secs=$((l - reserve)); [ "$secs" -gt 240 ] && secs=240
  if [ "$secs" -lt 45 ]; then skip "dapt-$shape-bf16-autotune" "${l}s left, ${reserve}s reserved"; return; fi
  mkdir -p "$WORK/tune-$shape"
  printf '[autotune]\nlevel = "%s"\n[autotune.logger]\nlevel = "minimal"\nfile = "%s"\nappend = false\n' \
    "${AUTOTUNE_LEVEL:-balanced}" "$LOGS/autotune-$shape.choices.log" >"$WORK/tune-$shape/cubecl.toml"
  (cd "$WORK/tune-$shape" && step "dapt-$shape-bf16-autotune" "$secs" "$WORKER_AT" --log-format json \
    train "$WORK/job-$shape.yaml" --device cuda --precision bf16 --no-checkpoints)
}

set -- $SHAPES
while [ $# -gt 0 ]; do
  shape=$1; shift
  rest=$#  # shapes still to measure after this one: ~90 s each
  measure "$shape" || continue
  if [ "${PROFILE:-1}" = 1 ] && [ "$shape" = 1b ]; then profile 1b; fi
  if [ "${NCU:-0}" = 1 ] && [ "$shape" = 1b ]; then ncu_kernels 1b; fi
  if [ "${AUTOTUNE:-1}" = 1 ] && [ -n "$WORKER_AT" ]; then
    autotune "$shape" $((30 + 90 * rest))
  fi
done
if [ "${AUTOTUNE:-1}" = 1 ] && [ -z "$WORKER_AT" ]; then skip autotune "no .gpu/dapt-worker-autotune"; fi
# The autotune results (small JSON logs), for the next run to start tuned.
tuned=$(cd "$DAPT_KERNEL_CACHE" 2>/dev/null && ls -d ./*/autotune 2>/dev/null)
if [ -n "$tuned" ]; then
  tar -czf "$OUT/autotune-cache.tgz" -C "$DAPT_KERNEL_CACHE" $tuned &&
    log "autotune results -> $OUT/autotune-cache.tgz (carry as .gpu/autotune-cache.tgz)"
fi

# --- 5. results ----------------------------------------------------------------------------------
du -sh "$DAPT_KERNEL_CACHE"/* >"$LOGS/kernel-cache.txt" 2>&1
cp .gpu/SIZES "$LOGS/sizes.txt" 2>/dev/null
$PY "$RESULTS" --logs "$LOGS" --out "$OUT" --anchor "$ANCHOR" --budget "$BUDGET" \
  --commit "$(cat .gpu/COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
log "done in $((SECONDS - started))s"
cp "$LOGS/summary.log" "$OUT/summary.log"
tar -czf "$OUT/logs.tgz" -C "$WORK" logs
ls -la "$OUT"
