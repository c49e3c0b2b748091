#!/usr/bin/env python3
"""Profiles one sequence-parallel lasp_attention forward+backward per rank (torch.profiler, CUDA kernels
and NCCL), beside the single-device call on rank 0: where the multi-rank overhead goes.

  NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 4 benchmarks/profile_sp.py --out prof/
Writes prof/trace_rank{r}.json (chrome trace) and prints each rank's kernel table.
"""
import argparse
import math
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile


def timeline(trace_path, strategy):
    """Per-stream kernel timeline of the last profiled step: start, duration and gap before each kernel
    (microseconds), and the step's span. NCCL kernels are what the exchange costs on the GPU."""
    import json

    with open(trace_path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    ev.sort(key=lambda e: e["ts"])
    sleeps = [i for i, e in enumerate(ev) if "spin_kernel" in e["name"] or "sleep" in e["name"].lower()]
    out = {"sp": [], "single": []}

    def table(events, t0):
        rows, last_end = [], {}
        for e in events:
            st = e["args"].get("stream", 0)
            gap = e["ts"] - last_end.get(st, e["ts"])
            last_end[st] = e["ts"] + e["dur"]
            rows.append(f"{e['ts'] - t0:9.1f} {e['dur']:8.1f} {gap:7.1f}  s{st:<3} {e['name'][:90]}")
        span = max(e["ts"] + e["dur"] for e in events) - t0 if events else 0.0
        return ["    start      dur     gap  stream kernel"] + rows + [f"  step span {span:.1f} us"]

    if len(sleeps) < 3:
        return {"sp": [f"(no step found in {trace_path})"], "single": []}
    # sequence-parallel steps: sleep, all_reduce, step; the 3rd sleep starts the last one
    third = sleeps[2]
    nxt = sleeps[3] if len(sleeps) > 3 else len(ev)
    seg = ev[third + 1:nxt]
    ar = next((i for i, e in enumerate(seg) if "AllReduce" in e["name"]), None)
    if ar is not None:
        t0 = seg[ar]["ts"] + seg[ar]["dur"]
        out["sp"] = table(seg[ar + 1:], t0)
    if len(sleeps) >= 6:  # rank 0: three single-device steps after that
        seg = ev[sleeps[-1] + 1:]
        out["single"] = table(seg, ev[sleeps[-1]]["ts"] + ev[sleeps[-1]]["dur"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-local", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--strategy", default="ring")
    ap.add_argument("--out", default="prof")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, W = dist.get_rank(), dist.get_world_size()
    import lasp

    H, D, n = args.heads, args.dim, args.n_local
    dev = torch.device("cuda")
    q, k, v, do = (torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    decay = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=dev)
    group = dist.group.WORLD

    def step(grp):
        q.grad = k.grad = v.grad = None
        lasp.lasp_attention(q, k, v, decay, scale=1 / math.sqrt(D), group=grp, layout="bnhd",
                            strategy=args.strategy).backward(do)

    flag = torch.zeros(1, device=dev)
    for _ in range(5):
        step(group)
    torch.cuda.synchronize()
    os.makedirs(args.out, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.cuda._sleep(2_000_000)
            dist.all_reduce(flag)
            step(group)
        torch.cuda.synchronize()
        if rank == 0:
            for _ in range(3):
                torch.cuda._sleep(2_000_000)
                step(None)
            torch.cuda.synchronize()
    trace = os.path.join(args.out, f"trace_rank{rank}.json")
    prof.export_chrome_trace(trace)
    lines = timeline(trace, args.strategy)
    for r in range(W):  # one rank at a time, in rank order
        if r == rank:
            print(f"== rank {rank}: last sequence-parallel step (t = 0 at the end of the step's all_reduce)")
            print("\n".join(lines["sp"]), flush=True)
            if rank == 0:
                print("== rank 0: last single-device step (t = 0 at the end of the sleep)")
                print("\n".join(lines["single"]), flush=True)
        dist.barrier()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    with open(os.path.join(args.out, f"table_rank{rank}.txt"), "w") as f:
        f.write(table)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
