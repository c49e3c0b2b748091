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
    prof.export_chrome_trace(os.path.join(args.out, f"trace_rank{rank}.json"))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    with open(os.path.join(args.out, f"table_rank{rank}.txt"), "w") as f:
        f.write(table)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
