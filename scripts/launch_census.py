#!/usr/bin/env python3
"""Kernel launches per training step of dapt's GPU step, counted without a GPU.

Runs `dapt-worker train JOB --device vulkan` (a worker built with the `wgpu` feature: the
resident engine and every fused kernel on Burn's wgpu backend; Mesa's lavapipe on a machine
without a GPU) with CubeCL's profiling logger on, and counts the launches of each kernel in each
step from CubeCL's log (one `| <duration> | <kernel>` line per launch, and a summary table at
each device synchronisation, as in scripts/gpu_results.py). The worker synchronises once a step,
after the backward passes (its `step phases` timing): so the first count is the first step's
passes alone, and each later one a whole step (the previous step's optimizer, then the passes). The durations are lavapipe's and mean nothing for a
GPU; the counts are the step's own: the same code launches the same kernels on CUDA (Burn's
matmul excepted, whose cubek variant differs by device).

Without --job it writes the tiny preset's job on the quickstart corpus (`dapt prepare` first).

    cargo build --workspace --bins && cargo build -p dapt-worker --features wgpu
    scripts/launch_census.py                   # tiny shape, 2 steps
    scripts/launch_census.py --job my.yaml --steps 3 --json census.json
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = re.compile(r"^\|\s*[0-9.]+\s*(?:ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")


def tiny_job(folder):
    corpus = os.path.join(ROOT, "examples/quickstart/corpus")
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as f:
        f.write(f"""job: census
seed: 5
model:
  preset: tiny
corpus:
  output: {folder}/corpus
  vocab_size: 512
  sources:
    - name: postgres
      role: domain
      paths: ["{corpus}/postgres/*.html"]
      weight: 3
      held_out: 0.2
training:
  seq_len: 32
  global_batch: 8
  micro_batch: 2
  tokens: 100000
  eval_every: 0
  optimizer:
    lr: 0.003
checkpoint:
  dir: {folder}/ck
  every: 1000000
""")
    return path


def steps_of(log):
    """The launches between the log's summary tables (one per device synchronisation): a Counter
    of kernel names for each."""
    steps, current = [], collections.Counter()
    for line in open(log, errors="replace"):
        if line.startswith("| Name") and "Duration" in line:
            steps.append(current)
            current = collections.Counter()
            continue
        m = LAUNCH.match(line)
        if m:
            current[m.group(1)] += 1
    return steps


def short(kernel):
    """A kernel's name without its runtime and generic arguments (Burn's matmul: `MatmulEntry`)."""
    parts = [p.strip() for p in kernel.split("|")]
    keep = [p for p in parts if p and not p.endswith("Runtime")]
    if keep and keep[0] == "MatmulEntry":
        return "MatmulEntry"
    return " | ".join(keep[:2]) if keep else kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=os.path.join(ROOT, "target/debug/dapt-worker"))
    ap.add_argument("--dapt", default=os.path.join(ROOT, "target/debug/dapt"))
    ap.add_argument("--job", help="a job file (default: the tiny preset on the quickstart corpus)")
    ap.add_argument("--steps", type=int, default=2, help="steps to train (default 2)")
    ap.add_argument("--json", help="also write the counts here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        job = args.job
        if job is None:
            job = tiny_job(folder)
            subprocess.run([args.dapt, "prepare", job], check=True, capture_output=True)
        log = os.path.join(folder, "kernels.log")
        with open(os.path.join(folder, "cubecl.toml"), "w") as f:
            f.write(f'[profiling.logger]\nlevel = "basic"\nfile = "{log}"\nappend = false\n')
        run = subprocess.run(
            [args.worker, "--log-format", "json", "train", os.path.abspath(job), "--device",
             "vulkan", "--no-checkpoints", "--stop-after", str(args.steps)],
            cwd=folder, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"dapt-worker failed ({run.returncode}):\n{run.stderr[-4000:]}")
        steps = steps_of(log)

    if not steps:
        sys.exit("no step in CubeCL's profile log")
    last = steps[-1]
    by_name = collections.Counter()
    for kernel, n in last.items():
        by_name[short(kernel)] += n
    print(f"launches per step: {[sum(s.values()) for s in steps]} "
          f"(the first: the first step's passes, without an optimizer step)")
    print(f"last step: {sum(last.values())} launches of {len(by_name)} kernels")
    for name, n in by_name.most_common():
        print(f"  {n:6d}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(launches_per_step=[sum(s.values()) for s in steps],
                           last_step=dict(by_name.most_common())), f, indent=1)


if __name__ == "__main__":
    main()
