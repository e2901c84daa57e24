#!/usr/bin/env python3
"""Peak resident memory per rank of real `dapt-worker`s, beside `dapt plan --gpu cpu`'s figure.

    scripts/memory_peaks.py [--bin target/debug] [--shapes tiny,d512] [--worlds 1,2,4]
                            [--recompute off,on] [--zero 0] [--work /tmp/dapt-memory]

For each shape, world size, ZeRO stage (`training.zero_stage`) and recompute setting it writes
a job (the quickstart corpus; the tiny preset, or a d512-shaped Hugging Face directory with
generated weights), runs
`dapt launch JOB --workers W` with `DAPT_ENGINE=resident` (the device engine on the CPU
backend, f32), reads every worker's VmHWM from /proc/<pid>/status every 50 ms, and stops the
run once the coordinator has logged step STOP (so the final checkpoint and export, which copy
the state to the host, are not part of the peak: the plan models the training step). It then
runs `dapt plan JOB --gpu cpu --gpus W` and prints both. MB = 1e6 bytes.
"""

import argparse
import array
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (model section, vocab_size, seq_len, global_batch, micro_batch, steps, stop at step)
SHAPES = {
    "tiny": ("preset: tiny", 512, 64, 8, 8, 60, 8),
    "d512": (None, 8192, 256, 4, 4, 12, 3),
}

D512 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 8192,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def write_d512(dir_):
    """A Hugging Face directory of the d512 shape with small deterministic weights."""
    os.makedirs(dir_, exist_ok=True)
    path = os.path.join(dir_, "model.safetensors")
    if os.path.exists(path):
        return
    c = D512
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    tensors = [("model.embed_tokens.weight", [v, h])]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors += [
            (f"{p}.input_layernorm.weight", [h]),
            (f"{p}.self_attn.q_proj.weight", [q, h]),
            (f"{p}.self_attn.k_proj.weight", [kv, h]),
            (f"{p}.self_attn.v_proj.weight", [kv, h]),
            (f"{p}.self_attn.o_proj.weight", [h, q]),
            (f"{p}.post_attention_layernorm.weight", [h]),
            (f"{p}.mlp.gate_proj.weight", [i, h]),
            (f"{p}.mlp.up_proj.weight", [i, h]),
            (f"{p}.mlp.down_proj.weight", [h, i]),
        ]
    tensors += [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
    block = array.array("f", [((k * 2654435761) % 1000 - 500) * 4e-5 for k in range(1 << 16)])
    block = block.tobytes()
    header, offset = {}, 0
    for name, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape in tensors:
            n = 1
            for s in shape:
                n *= s
            if name.endswith("norm.weight"):
                f.write(array.array("f", [1.0] * n).tobytes())
            else:
                data = block * (4 * n // len(block) + 1)
                f.write(data[: 4 * n])
    with open(os.path.join(dir_, "config.json"), "w") as f:
        json.dump(c, f, indent=1)


def write_job(work, shape, world, recompute, zero):
    model, vocab, seq, batch, micro, steps, _ = SHAPES[shape]
    if model is None:
        hf = os.path.join(work, "d512-hf")
        write_d512(hf)
        model = f"hf: {hf}"
    corpus = os.path.join(ROOT, "examples/quickstart/corpus")
    name = f"{shape}-w{world}-{'rc' if recompute else 'full'}-z{zero}"
    ck = os.path.join(work, "ck-" + name)
    subprocess.run(["rm", "-rf", ck], check=True)
    job = f"""job: {name}
seed: 5
model:
  {model}
corpus:
  output: {work}/corpus-{vocab}
  vocab_size: {vocab}
  sources:
    - name: postgres
      role: domain
      paths: ["{corpus}/postgres/*.html"]
      weight: 3
      held_out: 0.2
    - name: sotu
      role: replay
      paths: ["{corpus}/sotu/*.txt"]
      weight: 1
      held_out: 0.2
training:
  seq_len: {seq}
  global_batch: {batch}
  micro_batch: {micro}
  tokens: {steps * batch * seq}
  activation_checkpointing: {'true' if recompute else 'false'}
  zero_stage: {zero}
  optimizer:
    lr: 0.001
checkpoint:
  dir: {ck}
  every: 1000
"""
    path = os.path.join(work, name + ".yaml")
    with open(path, "w") as f:
        f.write(job)
    return path


def descendants(pid):
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True, text=True)
    children = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3:
            children.setdefault(int(parts[1]), []).append((int(parts[0]), parts[2].strip()))
    found, todo = [], [pid]
    while todo:
        for child, comm in children.get(todo.pop(), []):
            found.append((child, comm))
            todo.append(child)
    return found


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(bin_dir, job, world, stop_at, timeout=900):
    env = dict(os.environ, DAPT_ENGINE="resident")
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "dapt"), "--log-format", "json", "launch", job, "--workers", str(world)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    step = [0]

    def read():
        for line in proc.stderr:
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "step":
                step[0] = max(step[0], int(fields.get("step", 0)))

    threading.Thread(target=read, daemon=True).start()
    peaks = {}
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and step[0] < stop_at:
        for pid, comm in descendants(proc.pid):
            if comm.startswith("dapt-worker"):
                hwm = vm_hwm_kib(pid)
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
        time.sleep(0.05)
    reached = step[0]
    # The workers run in sessions of their own: stop them by pid, then the launcher.
    for pid, comm in descendants(proc.pid):
        if comm.startswith("dapt-worker"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if reached < stop_at:
        sys.exit(f"{job}: stopped at step {reached} before step {stop_at}")
    return [kib * 1024 / 1e6 for kib in peaks.values()]


def plan_mb(bin_dir, job, world):
    """The plan's figure in MB, or None where the binaries' `dapt plan` has no `--gpu cpu`."""
    out = subprocess.run(
        [os.path.join(bin_dir, "dapt"), "plan", job, "--gpu", "cpu", "--gpus", str(world)],
        capture_output=True,
        text=True,
    ).stdout
    m = re.search(r"memory per rank: ([\d.]+) (MB|GB)", out)
    if not m:
        return None, out
    return float(m.group(1)) * (1000 if m.group(2) == "GB" else 1), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/debug"))
    ap.add_argument("--shapes", default="tiny,d512")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--recompute", default="off,on")
    ap.add_argument("--zero", default="0", help="ZeRO stages, comma-separated")
    ap.add_argument("--work", default="/tmp/dapt-memory")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    print("| shape | ranks | zero | recompute | peak RSS per rank (MB) | plan (MB) | plan / measured |")
    print("|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        for world in [int(w) for w in a.worlds.split(",")]:
            for zero in [int(z) for z in a.zero.split(",")]:
                for rc in a.recompute.split(","):
                    recompute = rc == "on"
                    job = write_job(a.work, shape, world, recompute, zero)
                    peaks = measure(a.bin, job, world, SHAPES[shape][6])
                    planned, text = plan_mb(a.bin, job, world)
                    if a.verbose:
                        print(text, file=sys.stderr)
                    worst = max(peaks)
                    ranks = ", ".join(f"{p:.0f}" for p in sorted(peaks))
                    row = f"| {shape} | {world} | {zero} | {rc} | {ranks} |"
                    if planned is None:
                        print(f"{row} - | - |", flush=True)
                    else:
                        print(f"{row} {planned:.0f} | {planned / worst:.2f} |", flush=True)


if __name__ == "__main__":
    main()
