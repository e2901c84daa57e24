#!/usr/bin/env python3
"""Results of scripts/gpu-check.sh: reads its logs and writes results.json and results.md.

results.json is meant to be committed as docs/bench/h200-latest.json: the date, the commit
measured, the GPU, the fused-kernel tests' outcome, one row per training run (tokens/s over the
steps after the first three, MFU against --peak, peak GPU memory from nvidia-smi, every step's
loss and time), the loss parity of dapt against PyTorch on the same weights and data, the
ratios to PyTorch eager bf16, the per-kernel profile of the 1B step, and what was skipped.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys


def mem_gib(logs, name):
    try:
        vals = [int(x) for x in open(f"{logs}/mem-{name}.csv").read().split() if x.strip().isdigit()]
        return max(vals) / 1024 if vals else None
    except OSError:
        return None


def rc_of(logs, name):
    try:
        return int(open(f"{logs}/{name}.rc").read().strip())
    except (OSError, ValueError):
        return None


def flops_per_token(anchor, shape, cache={}):
    if shape not in cache:
        out = subprocess.run([sys.executable, anchor, "--shape", shape, "--flops-per-token"],
                             capture_output=True, text=True).stdout
        cache[shape] = json.loads(out)["flops_per_token"]
    return cache[shape]


def dapt_run(logs, path, anchor, peak):
    """One dapt-worker --log-format json training log."""
    name = os.path.basename(path)[:-4]
    parts = name.split("-")  # dapt-1b-bf16[-autotune], profile-1b-bf16, launch-1b-bf16
    shape, prec = parts[1], parts[2]
    kernels = "autotune" if name.endswith("-autotune") else "fixed"
    steps, phases, cache, matmul, device = [], [], None, None, []
    for line in open(path, errors="replace"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        f = rec.get("fields", rec)
        msg = f.get("message")
        if msg == "step" and "tokens_per_s" in f:
            steps.append(dict(step=int(f.get("step", len(steps))), loss=float(f.get("loss", "nan")),
                              tokens_per_s=float(f["tokens_per_s"])))
        elif msg == "step phases":
            phases.append([float(f[k]) for k in ("forward_backward_s", "all_reduce_s", "clip_adamw_s")
                           if k in f])
            if "device_reserved_mib" in f:
                device.append((float(f.get("device_in_use_mib", "nan")), float(f["device_reserved_mib"])))
        elif msg == "kernel cache":
            cache = f.get("dir")
        elif msg == "matmul on the GPU (DAPT_MATMUL)":
            matmul = f.get("matmul")
    row = dict(name=name, framework="dapt", shape=shape, precision=prec, kernels=kernels,
               rc=rc_of(logs, name), peak_gib=mem_gib(logs, name), kernel_cache=cache,
               matmul=matmul)
    if device:
        # CubeCL's allocator after each step: the tensors alive, and the pools' reservation
        # (its largest over the run), beside nvidia-smi's peak (peak_gib).
        row["allocator_mib"] = dict(last_in_use=device[-1][0], max_reserved=max(r for _, r in device))
    if not steps:
        row["error"] = "no step finished"
        return row
    timed = steps[3:] if len(steps) > 4 else steps[1:] or steps
    tps = len(timed) / sum(1 / s["tokens_per_s"] for s in timed)
    fpt = flops_per_token(anchor, shape)
    row.update(steps=len(steps), tokens_per_s=tps, mfu=tps * fpt / peak,
               first_step_tokens_per_s=steps[0]["tokens_per_s"], losses=[s["loss"] for s in steps],
               step_tokens_per_s=[s["tokens_per_s"] for s in steps])
    tp = phases[3:] if len(phases) > 4 else phases[1:] or phases
    if tp and all(len(p) == 3 for p in tp):
        row["phases_s"] = dict(zip(("forward_backward", "all_reduce", "clip_adamw"),
                                   (sum(p[i] for p in tp) / len(tp) for i in range(3))))
    return row


def torch_run(logs, path):
    name = os.path.basename(path)[:-4]
    recs = []
    for line in open(path, errors="replace"):
        if line.startswith("{"):
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    recs = [r for r in recs if "tokens_per_s" in r]
    if not recs:
        return dict(name=name, framework="pytorch", error="no result", rc=rc_of(logs, name))
    r = recs[-1]
    return dict(name=name, framework="pytorch", shape=r["shape"], precision=r["precision"],
                kernels="eager", steps=r["steps"], tokens_per_s=r["tokens_per_s"], mfu=r["mfu"],
                step_s=r["step_s"], losses=r.get("losses"), same_data=r.get("same_data"),
                same_init=r.get("same_init"), peak_gib=mem_gib(logs, name),
                torch_reserved_gib=r.get("max_reserved_gib"), torch=r.get("torch"),
                rc=rc_of(logs, name))


# `| 1.234ms    | Kernel | bf16 | ...`: one launch (CubeCL's summary tables, whose rows start with
# the kernel's name, do not match).
DURATION = re.compile(r"^\|\s*([0-9.]+)\s*(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")
UNIT = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def kernel_profile(logs, shape, steps, step_s):
    """CubeCL's profile log: one `| <duration> | <kernel>` line per launch, and a summary table
    (`| Name | Duration | Num Computed | Ratio |`) at the end of each profiled step: the launches
    before a table are that step's."""
    path = f"{logs}/profile-{shape}-bf16.kernels.log"
    if not os.path.exists(path):
        return None
    per, segments, current = {}, [], {}
    for line in open(path, errors="replace"):
        if line.startswith("| Name") and "Duration" in line:
            if current:
                segments.append(current)
            current = {}
            continue
        m = DURATION.match(line)
        if not m:
            continue
        secs = float(m.group(1)) * UNIT[m.group(2)]
        name = m.group(3)
        for table in (per, current):
            calls, total = table.get(name, (0, 0.0))
            table[name] = (calls + 1, total + secs)
    # Launches after the last table belong to no finished step (the run's end).
    trailing = sum(t for _, t in current.values())

    def top_of(table, n):
        total = sum(t for _, t in table.values())
        return total, [dict(kernel=k[:300], calls=c, total_s=t, share=t / total if total else None)
                       for k, (c, t) in sorted(table.items(), key=lambda kv: -kv[1][1])[:n]]

    total, top = top_of(per, 40)
    launches = sum(c for c, _ in per.values())
    out = dict(shape=shape, launches=launches, kernel_s=total, distinct_kernels=len(per), top=top)
    # Per profiled step: the first carries one-off work (uploads, first-use copies); the last
    # is the steady state.
    out["steps_profiled"] = [dict(kernel_s=t, launches=sum(c for c, _ in seg.values()), top=tp)
                             for seg in segments for t, tp in [top_of(seg, 8)]]
    out["kernel_s_after_last_step"] = trailing
    # The profiled run trained `steps` steps (--stop-after 2), each launch synchronised by the
    # profiler: compare the kernel time per step with the unprofiled run's step time.
    if steps:
        out.update(steps=steps, kernel_s_per_step=total / steps)
        if step_s:
            out.update(unprofiled_step_s=step_s, kernel_share_of_step=total / steps / step_s)
    if segments and step_s:
        last = out["steps_profiled"][-1]["kernel_s"]
        out.update(last_step_kernel_s=last, last_step_share_of_step=last / step_s)
    return out


def attention_timing(logs):
    """The attention timing lines of fused_gpu_timing (ms and TFLOP/s per forward + backward)."""
    path = f"{logs}/fused_gpu_timing.log"
    if not os.path.exists(path):
        return []
    text = open(path, errors="replace").read()
    # Under --nocapture a test's first line follows `test NAME ... ` on the same line.
    lines = []
    for line in text.splitlines():
        line = line.split(" ... ", 1)[-1] if line.startswith("test ") else line
        if line.startswith("attention hd ") or "decomposed" in line and " ms" in line:
            lines.append(line.strip())
    return lines


def parse_fields(line):
    """`key=value` and `key="quoted value"` pairs of one line, as a dict of strings."""
    return {k: (q if v.startswith('"') else v) for k, v, q in
            re.findall(r'(\w+)=("([^"]*)"|\S+)', line)}


def matmul_bench(logs):
    """Per DAPT_MATMUL strategy, its mmbench-STRATEGY log (the fused_gpu test
    gpu_speed_of_matmul_strategies): every problem's line, and the step's matmul seconds by the
    strategy and by Burn's matmul, timed alternating in the same process."""
    out = {}
    for path in sorted(glob.glob(f"{logs}/mmbench-*.log")):
        strategy = os.path.basename(path)[len("mmbench-"):-4]
        problems, step = [], None
        for line in open(path, errors="replace"):
            line = line.split(" ... ", 1)[-1] if line.startswith("test ") else line
            if line.startswith("matmul_timing "):
                problems.append(parse_fields(line))
            elif line.startswith("matmul_step "):
                step = parse_fields(line)
        # Its checks against the CPU (mmcheck-STRATEGY): each test run, FAILED if libtest's
        # closing list names it (under --nocapture a test's output splits its result line).
        checks, check_rc, refusals = {}, None, []
        check_path = f"{logs}/mmcheck-{strategy}.log"
        if os.path.exists(check_path):
            text = open(check_path, errors="replace").read()
            refusals = [l.strip() for l in text.splitlines() if " refuses " in l]
            failed = set(re.findall(r"^    (matmul::\S+)$", text, re.M))
            checks = {t: "FAILED" if t in failed else "ok"
                      for t in re.findall(r"^test (matmul::\S+) \.\.\.", text, re.M)}
            check_rc = rc_of(logs, f"mmcheck-{strategy}")
            if check_rc != 0 and not failed:
                checks = {t: "unknown (rc {})".format(check_rc) for t in checks}
        out[strategy] = dict(
            rc=rc_of(logs, f"mmbench-{strategy}"), problems=problems, checks=checks,
            check_rc=check_rc, check_refusals=refusals,
            step_s=float(step["s"]) if step else None,
            burn_step_s=float(step["burn_s"]) if step else None,
            wrong=[q.get("shape") for q in problems if q.get("status") == "wrong"],
            unsupported=[q.get("shape") for q in problems if q.get("status") == "unsupported"])
    return out


def best_matmul(bench, margin=1.03):
    """The strategy whose step matmul time beats Burn's (timed in the same process) by the most,
    and by at least `margin`; only complete timings (rc 0, a matmul_step line) with no wrong
    result and no failed check (mmcheck rc 0, or not run) count. 'burn' when none does."""
    best, best_gain = "burn", margin
    for strategy, r in bench.items():
        if (r["rc"] == 0 and r["check_rc"] in (0, None) and r["step_s"] and r["burn_step_s"]
                and not r["wrong"]):
            gain = r["burn_step_s"] / r["step_s"]
            if gain > best_gain:
                best, best_gain = strategy, gain
    return best


def fused_tests(logs):
    path = f"{logs}/fused_gpu.log"
    if not os.path.exists(path):
        return dict(ran=False)
    text = open(path, errors="replace").read()
    results = re.findall(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", text, re.M)
    summary = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", text)
    return dict(ran=True, rc=rc_of(logs, "fused_gpu"),
                passed=sum(1 for _, r in results if r == "ok"),
                failed=[t for t, r in results if r == "FAILED"],
                ignored=sum(1 for _, r in results if r == "ignored"),
                result=summary.group(1) if summary else "no summary (crashed or timed out?)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--logs", required=True)
    p.add_argument("--out")
    p.add_argument("--anchor")
    p.add_argument("--best-matmul", action="store_true",
                   help="print the fastest DAPT_MATMUL strategy of the mmbench logs and stop")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--budget", type=int)
    p.add_argument("--peak", type=float, default=790e12)
    a = p.parse_args()
    logs = a.logs
    if a.best_matmul:
        print(best_matmul(matmul_bench(logs)))
        return
    if not a.out or not a.anchor:
        p.error("--out and --anchor are required")
    probe = open(f"{logs}/probe.log", errors="replace").read() if os.path.exists(f"{logs}/probe.log") else ""
    gpu = re.search(r"^(NVIDIA[^,]*), ([0-9.]+), ([0-9]+ MiB)", probe, re.M)
    rows = []
    for path in sorted(glob.glob(f"{logs}/dapt-*.log") + glob.glob(f"{logs}/launch-*-bf16.log")
                       + glob.glob(f"{logs}/restart-*-bf16.log")
                       + glob.glob(f"{logs}/zero2-*-bf16.log")
                       + glob.glob(f"{logs}/blockwise-*-bf16.log")
                       + glob.glob(f"{logs}/kernels-*-bf16.log")
                       + glob.glob(f"{logs}/matmul-*-bf16.log")
                       + glob.glob(f"{logs}/oneblock-*-bf16.log")):
        rows.append(dapt_run(logs, path, a.anchor, a.peak))
    for path in sorted(glob.glob(f"{logs}/torch-*.log")):
        rows.append(torch_run(logs, path))
    by = {r["name"]: r for r in rows if "error" not in r}

    parity = []
    for shape in ("1b", "135m"):
        d, t = by.get(f"dapt-{shape}-bf16"), by.get(f"torch-{shape}-bf16")
        if d and t and t.get("losses") and t.get("same_data") and t.get("same_init"):
            n = min(len(d["losses"]), len(t["losses"]))
            pairs = list(zip(d["losses"][:n], t["losses"][:n]))
            parity.append(dict(shape=shape, steps=n, dapt=[x for x, _ in pairs],
                               pytorch=[y for _, y in pairs],
                               max_abs_diff=max(abs(x - y) for x, y in pairs) if pairs else None,
                               first_step_abs_diff=abs(pairs[0][0] - pairs[0][1]) if pairs else None))
    # The PTX cache: a restart's first step against the cold run's (which compiled every kernel).
    ptx_cache = []
    for shape in ("1b", "135m"):
        cold, warm = by.get(f"dapt-{shape}-bf16"), by.get(f"restart-{shape}-bf16")
        if cold and warm:
            tokens = (16 * 1024)
            ptx_cache.append(dict(shape=shape,
                                  cold_first_step_s=tokens / cold["first_step_tokens_per_s"],
                                  warm_first_step_s=tokens / warm["first_step_tokens_per_s"],
                                  later_step_s=tokens / cold["tokens_per_s"]))
    def beside(run, base_key, other_key):
        """Per shape, the losses of dapt-SHAPE-bf16 and of `run`-SHAPE-bf16 step by step."""
        out = []
        for shape in ("1b", "135m"):
            d, o = by.get(f"dapt-{shape}-bf16"), by.get(f"{run}-{shape}-bf16")
            if d and o and d.get("losses") and o.get("losses"):
                pairs = list(zip(d["losses"], o["losses"]))
                out.append({"shape": shape, "steps": len(pairs),
                            base_key: [x for x, _ in pairs], other_key: [y for _, y in pairs],
                            "max_abs_diff": max(abs(x - y) for x, y in pairs),
                            f"{base_key}_tokens_per_s": d.get("tokens_per_s"),
                            f"{other_key}_tokens_per_s": o.get("tokens_per_s")})
        return out

    # ZeRO stage 2 over a one-rank NCCL communicator against stage 0, step by step.
    zero_parity = beside("zero2", "stage0", "stage2")
    # Attention by the unit-level kernels (DAPT_ATTENTION=kernels) against the default, blockwise
    # (the same job and data); runs of an older script named the other way round.
    blockwise_parity = (beside("kernels", "blockwise", "kernels")
                        or [dict(r, note="dapt run with the kernels") for r in
                            beside("blockwise", "kernels", "blockwise")])
    # The model with the fastest DAPT_MATMUL strategy against Burn's matmul (the same job and data).
    matmul_parity = beside("matmul", "burn", "strategy")
    # Blockwise attention in one block (DAPT_ATTENTION_BLOCK=seq, with the chosen strategy)
    # against the default blocks: the base is the matmul-SHAPE run when there is one.
    oneblock_parity = []
    for shape in ("1b", "135m"):
        o = by.get(f"oneblock-{shape}-bf16")
        base = by.get(f"matmul-{shape}-bf16") or by.get(f"dapt-{shape}-bf16")
        if o and base and o.get("losses") and base.get("losses"):
            pairs = list(zip(base["losses"], o["losses"]))
            oneblock_parity.append(dict(shape=shape, base=base["name"], steps=len(pairs),
                                        max_abs_diff=max(abs(x - y) for x, y in pairs),
                                        base_tokens_per_s=base.get("tokens_per_s"),
                                        oneblock_tokens_per_s=o.get("tokens_per_s")))
    bench = matmul_bench(logs)
    ratios = []
    for shape in ("1b", "135m"):
        t = by.get(f"torch-{shape}-bf16")
        for run in ("dapt-{}-bf16", "dapt-{}-bf16-autotune", "dapt-{}-f32", "launch-{}-bf16",
                    "blockwise-{}-bf16", "kernels-{}-bf16", "matmul-{}-bf16",
                    "oneblock-{}-bf16"):
            d = by.get(run.format(shape))
            if d and t:
                ratios.append(dict(shape=shape, run=d["name"], vs="pytorch eager bf16",
                                   ratio=d["tokens_per_s"] / t["tokens_per_s"]))
    prof_run = dapt_run(logs, f"{logs}/profile-1b-bf16.log", a.anchor, a.peak) \
        if os.path.exists(f"{logs}/profile-1b-bf16.log") else None
    base = by.get("dapt-1b-bf16")
    profile = kernel_profile(logs, "1b", (prof_run or {}).get("steps"),
                             16 * 1024 / base["tokens_per_s"] if base else None)
    if profile and prof_run:
        profile["profiled_run"] = {k: prof_run.get(k) for k in ("steps", "step_tokens_per_s", "rc")}
    # CubeCL's autotune log (level minimal): the variant chosen per matmul/reduction key.
    choices = {}
    for path in sorted(glob.glob(f"{logs}/autotune-*.choices.log")):
        shape = os.path.basename(path).split("-")[1].split(".")[0]
        lines = [l.rstrip() for l in open(path, errors="replace") if l.strip()]
        choices[shape] = dict(lines=len(lines), head=[l[:400] for l in lines[:300]])
    skipped = open(f"{logs}/skipped.txt").read().splitlines() if os.path.exists(f"{logs}/skipped.txt") else []
    sizes = open(f"{logs}/sizes.txt").read() if os.path.exists(f"{logs}/sizes.txt") else None
    date = probe.splitlines()[0] if probe else None
    result = dict(date=date, commit=a.commit, gpu=gpu.group(1) if gpu else None,
                  driver=gpu.group(2) if gpu else None, gpu_memory=gpu.group(3) if gpu else None,
                  peak_flops=a.peak, budget_s=a.budget, fused_gpu=fused_tests(logs),
                  attention_timing=attention_timing(logs), runs=rows,
                  loss_parity=parity, zero_parity=zero_parity, blockwise_parity=blockwise_parity,
                  matmul_strategies=bench, best_matmul=best_matmul(bench) if bench else None,
                  matmul_parity=matmul_parity, oneblock_parity=oneblock_parity, ptx_cache=ptx_cache, ratios=ratios, profile_1b=profile, autotune_choices=choices,
                  skipped=skipped,
                  carried_sizes=sizes)
    with open(f"{a.out}/results.json", "w") as f:
        json.dump(result, f, indent=1)

    md = [f"# gpu-check {date} on {result['gpu']} (commit {a.commit})", ""]
    ft = result["fused_gpu"]
    md.append(f"fused_gpu: {ft.get('result', 'not run')}; passed {ft.get('passed', 0)}, "
              f"failed {ft.get('failed', [])}" if ft["ran"] else "fused_gpu: not run")
    md += [f"    {line}" for line in result.get("attention_timing", [])]
    if bench:
        md += ["", f"matmul strategies (1B step's matmuls, bf16; best: {result['best_matmul']}):", "",
               "| DAPT_MATMUL | rc | checks rc | step matmul s | Burn's, same process | gain | wrong | refused |",
               "|---|---:|---:|---:|---:|---:|---|---|"]
        for strategy, r in bench.items():
            gain = (f"{r['burn_step_s'] / r['step_s']:.2f}x" if r["step_s"] and r["burn_step_s"] else "")
            md.append(f"| {strategy} | {r['rc']} | {r['check_rc'] if r['check_rc'] is not None else ''} | {r['step_s'] or ''} | {r['burn_step_s'] or ''} | {gain} | "
                      f"{', '.join(r['wrong'])} | {', '.join(r['unsupported'])} |")
    md += ["", "| run | kernels | tokens/s | MFU | peak GiB | steps | first step tokens/s | loss first -> last |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['name']} | {r.get('kernels', '')} | {r['error']} (rc {r.get('rc')}) | | | | | |")
            continue
        mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "?"
        ls = r.get("losses") or []
        loss = f"{ls[0]:.3f} -> {ls[-1]:.3f}" if ls else ""
        first = f"{r['first_step_tokens_per_s']:,.0f}" if "first_step_tokens_per_s" in r else ""
        md.append(f"| {r['name']} | {r['kernels']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                  f"{mem} | {r['steps']} | {first} | {loss} |")
    for r in rows:
        if r.get("allocator_mib"):
            a_ = r["allocator_mib"]
            md.append(f"\n{r['name']}: CubeCL allocator after the last step {a_['last_in_use']:,.0f} MiB in use, "
                      f"at most {a_['max_reserved']:,.0f} MiB reserved (nvidia-smi peak {r.get('peak_gib') or 0:.1f} GiB)")
    for x in ratios:
        md.append(f"\n{x['shape']}: {x['run']} / PyTorch eager bf16 = {x['ratio']:.3f}x")
    for x in parity:
        md.append(f"\nloss parity {x['shape']} over {x['steps']} steps: max |dapt - pytorch| = "
                  f"{x['max_abs_diff']:.4f} (first step {x['first_step_abs_diff']:.4f})")
    for x in matmul_parity:
        md.append(f"\nmatmul strategy {x['shape']}: losses within {x['max_abs_diff']:.4f} of Burn's matmul "
                  f"over {x['steps']} steps; {x['strategy_tokens_per_s'] or 0:,.0f} against "
                  f"{x['burn_tokens_per_s'] or 0:,.0f} tokens/s")
    for x in oneblock_parity:
        md.append(f"\nattention in one block {x['shape']}: losses within {x['max_abs_diff']:.4f} of "
                  f"{x['base']} over {x['steps']} steps; {x['oneblock_tokens_per_s'] or 0:,.0f} against "
                  f"{x['base_tokens_per_s'] or 0:,.0f} tokens/s")
    for x in ptx_cache:
        md.append(f"\nPTX cache {x['shape']}: first step {x['cold_first_step_s']:.1f} s cold, "
                  f"{x['warm_first_step_s']:.1f} s on restart (other steps {x['later_step_s']:.2f} s)")
    if profile:
        per = profile.get("kernel_s_per_step")
        share = profile.get("kernel_share_of_step")
        md.append(f"\nprofile 1B bf16: {profile['launches']} launches of {profile['distinct_kernels']} "
                  f"kernels, {profile['kernel_s']:.2f} s of kernel time"
                  + (f", {per:.3f} s per step" if per else "")
                  + (f" = {100 * share:.0f}% of the unprofiled step ({profile['unprofiled_step_s']:.3f} s)"
                     if share else ""))
        for i, st in enumerate(profile.get("steps_profiled", [])):
            md.append(f"profiled step {i + 1}: {st['kernel_s']:.3f} s of kernel time in {st['launches']} "
                      "launches; top: " + ", ".join(f"{t['kernel'].split(' / ')[0][:40]} {t['total_s']:.3f} s"
                                                    for t in st["top"][:4]))
        md += ["", "| kernel | calls | total s | share |", "|---|---:|---:|---:|"]
        for k in profile["top"][:15]:
            md.append(f"| {k['kernel'][:90].replace('|', '/')} | {k['calls']} | {k['total_s']:.3f} | "
                      f"{100 * (k['share'] or 0):.1f}% |")
    if skipped:
        md += ["", "skipped: " + "; ".join(skipped)]
    text = "\n".join(md) + "\n"
    open(f"{a.out}/results.md", "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
