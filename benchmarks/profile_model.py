#!/usr/bin/env python3
"""Where a model step's GPU time goes, per method: one profiled forward+backward of the bench_model.py
model (same flags) after warm-up, its CUDA kernels summed into classes (lasp's attention kernels, matrix
multiplies, NCCL, elementwise and reductions, copies) on rank 0, beside the step's wall time.

  NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 4 benchmarks/profile_model.py \\
      --preset small --seq-len 262144 --checkpoint --methods lasp,ulysses --json prof.json

Kernel time summed over streams can exceed the wall time where streams overlap; the gap between the
wall time and the sum on the compute stream is time the GPU waited (host launches, communication).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402

CLASSES = (  # first match wins
    ("lasp attention", ("lasp::", "peer_hop")),
    ("nccl", ("nccl",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("copy / cat / index", ("copy", "cat", "index", "gather", "scatter", "fill", "memset", "memcpy", "Memcpy", "Memset")),
    ("reduction", ("reduce", "norm", "softmax", "cross_entropy", "nll", "logsumexp", "sum")),
)


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k.lower() in low for k in keys):
            return cls
    return "elementwise / other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["tiny", "small", "b1"], default="small")
    ap.add_argument("--seq-len", type=int, default=262144)
    ap.add_argument("--methods", default="lasp,ulysses")
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--compile", action="store_true", help="LaspConfig.compile (as bench_model.py --compile)")
    ap.add_argument("--param-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per method")
    ap.add_argument("--json")
    args = ap.parse_args()

    lasp = bench_model._import_lasp()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl")
    W, rank = dist.get_world_size(), dist.get_rank()
    group = lasp.distributed.sp_group(lasp.distributed.init_mesh(sp=W, device_type="cuda"))
    cfg = getattr(lasp.models.LaspConfig, args.preset)()
    cfg.checkpoint_layers = args.checkpoint
    cfg.compile = args.compile
    model = bench_model.build_model(lasp, cfg, device, args.param_dtype)
    makers = bench_model.method_makers(lasp, group)
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq_len + 1), generator=g)
    ids = lasp.distributed.split_sequence(tokens[:, :-1], group).to(device)
    labels = lasp.distributed.split_sequence(tokens[:, 1:], group).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.param_dtype == "fp32")

    def step():
        with autocast:
            out = model(ids, labels, sp_group=group, loss_normalizer=float(args.seq_len))
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    report = dict(bench_model.env_info(device), seq_len=args.seq_len, preset=args.preset, compile=args.compile,
                  param_dtype=args.param_dtype, methods={})
    for m in args.methods.split(","):
        attn = makers[m]()
        bench_model.use_attn(lasp, model, attn)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_plain = time.perf_counter() - t0
        dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        classes, kernels = {}, {}
        for e in prof.key_averages():
            t = e.device_time_total  # us
            if t <= 0:
                continue
            c = classify(e.key)
            classes[c] = classes.get(c, 0.0) + t
            kernels[e.key] = (t, e.count, c)
        # every rank's class totals, and its ring-hop kernels one by one in launch order (the forward's,
        # then the recomputed forward's and the backward's, layer by layer): where the hops wait
        hops = sorted((e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
                      if e.device_type == DeviceType.CUDA and "peer_hop" in e.name)
        mine = {"classes_ms": {k: v / 1e3 for k, v in classes.items()}, "hop_us": [round(d, 1) for _, d in hops]}
        per_rank = [None] * W
        dist.all_gather_object(per_rank, mine)
        report["methods"][m] = {"wall_ms": wall_plain * 1e3, "classes_ms": mine["classes_ms"],
                                "top": [(k[:120], v[0] / 1e3, v[1], v[2]) for k, v in
                                        sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]],
                                "per_rank": per_rank}
        if rank == 0:
            r = report["methods"][m]
            print(f"\n== {m}: step {r['wall_ms']:.1f} ms (unprofiled), kernel time by class (rank 0):")
            for c, v in sorted(r["classes_ms"].items(), key=lambda kv: -kv[1]):
                print(f"   {c:22s} {v:9.2f} ms")
            print(f"   {'sum':22s} {sum(r['classes_ms'].values()):9.2f} ms")
            for name, ms, n, c in r["top"]:
                print(f"     {ms:8.2f} ms {n:5d}x  [{c}] {name}")
            names = sorted({c for pr in per_rank for c in pr["classes_ms"]})
            print("   per rank (ms): " + " | ".join(f"{c}" for c in names))
            for i, pr in enumerate(per_rank):
                print(f"     rank {i}: " + " | ".join(f"{pr['classes_ms'].get(c, 0.0):.2f}" for c in names))
                if pr["hop_us"]:
                    print(f"       hops (us, launch order): {pr['hop_us']}")
        del attn
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
