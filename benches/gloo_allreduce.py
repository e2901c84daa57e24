#!/usr/bin/env python3
"""Gloo anchor for dapt's all-reduce benchmark (worker/benches/allreduce.rs).

Times torch.distributed.all_reduce (SUM, the gloo backend, fp32 CPU tensors) between N rank
processes on 127.0.0.1, and prints one JSON line per size:
seconds per call (the slowest rank's mean), algbw = bytes / time and
busbw = algbw * 2(n-1)/n in GB/s (1e9 B), as nccl-tests defines them.

    python3 benches/gloo_allreduce.py [--ranks 2,4] [--sizes 1,4,16,64,256] (MiB)
        [--warmup 2] [--iters N] [--table]
Without --iters each size runs clamp(1 GiB / size, 5, 100) timed calls, as the Rust bench does.
Each rank uses one intra-op thread and OMP_WAIT_POLICY=PASSIVE (2-core machines). Gloo reduces
with SUM only (it has no AVG); dapt's ring also scales by 1/n, so this slightly favours Gloo.
"""
import argparse, json, os, socket, time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MIB = 1 << 20


def timed_iters(nbytes):
    return max(5, min(100, (1 << 30) // max(nbytes, 1)))


def rank_main(rank, world, port, sizes, warmup, iters, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for mib in sizes:
        n = mib * MIB // 4
        buf = torch.arange(n, dtype=torch.float32).remainder_(1000).add_(rank)
        for _ in range(warmup):
            dist.all_reduce(buf)
        dist.barrier()
        k = iters or timed_iters(mib * MIB)
        start = time.perf_counter()
        for _ in range(k):
            dist.all_reduce(buf)
        queue.put((mib, rank, (time.perf_counter() - start) / k))
        del buf
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, sizes, warmup, iters):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, sizes, warmup, iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    times = {}
    for _ in range(world * len(sizes)):
        mib, _rank, secs = queue.get(timeout=600)
        times[mib] = max(times.get(mib, 0.0), secs)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a rank exited with {p.exitcode}")
    rows = []
    for mib in sizes:
        secs = times[mib]
        algbw = mib * MIB / secs / 1e9
        rows.append(dict(impl="gloo", ranks=world, mib=mib, bytes=mib * MIB, seconds=secs, algbw_gbs=algbw,
                         busbw_gbs=algbw * 2 * (world - 1) / world, torch=torch.__version__))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--sizes", default="1,4,16,64,256", help="MiB, comma-separated")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="a markdown table instead of JSON lines")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.table:
        print("| ranks | size | ms | algbw GB/s | busbw GB/s |\n|---|---|---|---|---|")
    for world in (int(r) for r in a.ranks.split(",")):
        load = open("/proc/loadavg").read().split()[:3]
        for row in run(world, sizes, a.warmup, a.iters):
            row["load_before"] = " ".join(load)
            if a.table:
                print(f"| {world} | {row['mib']} MiB | {row['seconds'] * 1e3:.2f} | {row['algbw_gbs']:.2f} "
                      f"| {row['busbw_gbs']:.2f} |", flush=True)
            else:
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
