#!/usr/bin/env python3
"""Times lasp's gated delta rule (Gated DeltaNet) against flash-linear-attention's chunk_gated_delta_rule.

Forward and forward+backward per shape B x H x N x D (E = D) or B x H x N x D x E, bf16 q, k, v in fla's layout
(B, N, H, .), log gates g = logsigmoid(x) / 16 and beta = sigmoid(x) in fp32 (B, N, H), q and k l2-normalised
in the op (use_qk_l2norm, fla's use_qk_l2norm_in_kernel), gradients of q, k, v, g and beta:
  lasp        lasp.gated_delta_attention(..., layout="bnhd") with LASP_DELTA_KERNELS=cuda (the default: for
              16-bit q, k, v with D and E in {64, 128} the 16-bit kernels, the forward's on sm_90 and the
              backward's on sm_80 and later; elsewhere the chain of states and the chunks' solves as CUDA
              kernels, the rest ATen operations)
  lasp-aten   the same with LASP_DELTA_KERNELS=aten (all of it ATen operations)
  lasp-fused  the same with LASP_DELTA_KERNELS=fused (the chunks' fused WY, output and gradient kernels too)
  fla         fla.ops.gated_delta_rule.chunk_gated_delta_rule(...). fla 0.6.0 refuses its gated backward on
              Hopper under Triton 3.4 to 3.7.0 (its issue 640); this script lifts that refusal to time it and
              records so in the JSON ("fla_hopper_refusal_lifted").

Before timing, each implementation's outputs and gradients on input set 0 are compared with fla's (relative
norm of the difference, printed and in the JSON); on the CPU (--device cpu, a smoke run of the script) with
the float64 recurrence instead. CUDA events, warm-up, median of --reps; inputs rotated among sets larger than
L2. The memory floor: the forward reads q, k, v (bf16), g and beta (fp32) and writes o; the backward reads
them and do and writes dq, dk, dv, dg, dbeta, at the measured copy rate.

On CUDA, also the memory each implementation keeps for the backward ("held", MiB; JSON "held"): the bytes
allocated after one recorded forward, less those before it and the output, with q, k and v made by an earlier
operation (as projections make them) and dropped by the caller, so that only what autograd keeps remains.

--qk-heads HQ: GVA (q and k with HQ heads, v, g, beta and the output with H), as Qwen3-Next's linear attention
(16 q/k heads, 32 value heads):

  python3 benchmarks/bench_delta.py --shapes 4x32x8192x128 --qk-heads 16 --json delta.json
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import copy_bandwidth as cuda_copy_bandwidth, git_commit, rel  # noqa: E402  (shared helpers)

SHAPES = [(4, 32, 8192, 128), (1, 16, 65536, 128)]


def bench(fn, nsets, device, warmup=2, reps=10):
    """Median ms of fn(i) over reps calls, i rotating over nsets input sets."""
    for i in range(warmup):
        fn(i % nsets)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for r in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(r % nsets)
            e.record()
            sync()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn(r % nsets)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def held_for_backward(f, ins):
    """Bytes that the forward f keeps for the backward (CUDA): allocated after it, less before it and the
    output, with q, k and v made by an earlier operation (x * 1.0: new storage, whose backward keeps nothing)
    and dropped before the count."""
    leaves = [t.detach().clone().requires_grad_(True) for t in ins]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    made = [x * 1.0 for x in leaves[:3]] + leaves[3:]
    o = f(made)
    del made
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - o.numel() * o.element_size()
    del o
    return held


def copy_bandwidth(device):
    return cuda_copy_bandwidth() if device.type == "cuda" else float("nan")


def make_set(B, H, HQ, N, D, E, dtype, device, seed):
    g_ = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g_)  # noqa: E731
    q, k = rn(B, N, HQ, D).to(device, dtype), rn(B, N, HQ, D).to(device, dtype)
    v, do = rn(B, N, H, E).to(device, dtype), rn(B, N, H, E).to(device, dtype)
    g = (torch.nn.functional.logsigmoid(rn(B, N, H)) / 16).to(device)
    beta = torch.sigmoid(rn(B, N, H)).to(device)
    return (q, k, v, g, beta), do


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="BxHxNxD[xE], comma-separated (default: the two headline shapes)")
    ap.add_argument("--impls", default="lasp,lasp-fused,lasp-aten,fla")
    ap.add_argument("--qk-heads", type=int, default=0, help="q / k heads (GVA; default: H)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run: small shapes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in ("lasp", "lasp-aten", "lasp-fused", "fla"):
            raise SystemExit(f"bench_delta: --impls: unknown {i!r}; expected some of lasp, lasp-aten, lasp-fused, fla")
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "commit": os.environ.get("LASP_COMMIT") or git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    import lasp

    fla_fn = None
    if "fla" in impls:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_fn
            import fla
            import fla.ops.common.chunk_o as fla_chunk_o
            info["fla"] = getattr(fla, "__version__", "?")
            if getattr(fla_chunk_o, "IS_NVIDIA_HOPPER", False):
                fla_chunk_o.IS_NVIDIA_HOPPER = False  # the refusal's switch (read at call time)
                info["fla_hopper_refusal_lifted"] = True
        except Exception as e:
            print(f"# fla not importable ({type(e).__name__}: {e}); skipping 'fla'")
            impls = [i for i in impls if i != "fla"]
    if device.type != "cuda":
        impls = [i for i in impls if i == "lasp"]  # one composition on the CPU; fla needs a GPU
    bw = copy_bandwidth(device)
    info["copy_GBps"] = bw / 1e9
    print("# " + "  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows, checks, held = [], [], []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in shapes:
        if len(shape) not in (4, 5):
            raise SystemExit(f"--shapes: expected BxHxNxD or BxHxNxDxE, got {'x'.join(map(str, shape))}")
        B, H, N, D = shape[:4]
        E = shape[4] if len(shape) == 5 else D
        HQ = args.qk_heads or H
        if H % HQ:
            raise SystemExit(f"--qk-heads: must divide the shape's heads {H}, got {HQ}")
        name = "x".join(map(str, shape)) + (f"-qk{HQ}" if HQ != H else "")
        scale = D ** -0.5
        esz = 2 if dtype == torch.bfloat16 else 4
        qk_bytes, v_bytes, gb_bytes = B * N * HQ * D * esz, B * N * H * E * esz, B * N * H * 4
        floor_fwd = 2 * qk_bytes + 2 * v_bytes + 2 * gb_bytes              # q, k, v, g, beta read; o written
        floor_bwd = 4 * qk_bytes + 3 * v_bytes + 4 * gb_bytes              # + do read; dq, dk, dv, dg, dbeta
        floor = {"fwd": floor_fwd, "fwd+bwd": floor_fwd + floor_bwd}
        one = 2 * qk_bytes + 2 * v_bytes + 2 * gb_bytes
        nsets = max(2, min(4, math.ceil(200e6 / one))) if device.type == "cuda" else 1
        sets = [make_set(B, H, HQ, N, D, E, dtype, device, 100 + i) for i in range(nsets)]

        def ours(kernels):
            def f(ins):
                os.environ["LASP_DELTA_KERNELS"] = kernels
                return lasp.gated_delta_attention(*ins, scale=scale, layout="bnhd", use_qk_l2norm=True)
            return f

        fns = {}
        if "lasp" in impls:
            fns["lasp"] = ours("cuda")
        if "lasp-aten" in impls:
            fns["lasp-aten"] = ours("aten")
        if "lasp-fused" in impls:
            fns["lasp-fused"] = ours("fused")
        if "fla" in impls:
            fns["fla"] = lambda ins: fla_fn(*ins, scale=scale, use_qk_l2norm_in_kernel=True)[0]
        # correctness first: outputs and the five gradients on set 0, against fla (GPU) or float64 (CPU)
        outs = {}
        for impl, f in list(fns.items()) + ([("float64", None)] if device.type != "cuda" else []):
            leaves = [t.detach().clone().requires_grad_(True) for t in sets[0][0]]
            if impl == "float64":
                from lasp.reference import gated_delta_recurrent
                t = lambda x: x.detach().double().transpose(1, 2).contiguous().requires_grad_(True)  # noqa: E731
                leaves = [t(x) for x in sets[0][0]]
                o = gated_delta_recurrent(*leaves, scale=scale, use_qk_l2norm=True)[0].transpose(1, 2)
            else:
                o = f(leaves)
            gr = torch.autograd.grad(o, leaves, sets[0][1].to(o.dtype))
            if impl == "float64":
                gr = [x.transpose(1, 2) for x in gr]
            outs[impl] = [o.detach()] + [x.detach() for x in gr]
        ref_name = "fla" if "fla" in outs else ("float64" if "float64" in outs else None)
        for impl in fns:
            if ref_name is None or impl == ref_name:
                continue
            errs = {n: rel(a, b) for n, a, b in zip(("o", "dq", "dk", "dv", "dg", "dbeta"), outs[impl], outs[ref_name])}
            checks.append({"shape": name, "impl": impl, "vs": ref_name, "rel_err": errs})
            print(f"# {name} {impl} vs {ref_name}: " + "  ".join(f"{n} {e:.2e}" for n, e in errs.items()), flush=True)
        del outs
        if device.type == "cuda":
            for impl, f in fns.items():
                mib = held_for_backward(f, sets[0][0]) / 2**20
                held.append({"shape": name, "impl": impl, "held_MiB": mib})
                print(f"# {name} {impl}: {mib:.1f} MiB kept for the backward", flush=True)
        for impl, f in fns.items():
            leaves_sets = [([t.detach().clone().requires_grad_(True) for t in s[0]], s[1]) for s in sets]
            with torch.no_grad():
                ms_f = bench(lambda i: f(leaves_sets[i][0]), nsets, device, reps=args.reps)

            def fb(i):
                o = f(leaves_sets[i][0])
                torch.autograd.grad(o, leaves_sets[i][0], leaves_sets[i][1])
            ms_fb = bench(fb, nsets, device, reps=args.reps)
            for mode, ms in (("fwd", ms_f), ("fwd+bwd", ms_fb)):
                fl = floor[mode] / bw * 1e3
                rows.append({"shape": name, "impl": impl, "mode": mode, "ms": ms, "floor_ms": fl, "x_floor": ms / fl})
                print(f"# {name} {impl:<10} {mode:<8} {ms:9.3f} ms  floor {fl:.3f} ms", flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"info": info, "rows": rows, "checks": checks, "held": held, "complete": False}, fh,
                              indent=1)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    os.environ.pop("LASP_DELTA_KERNELS", None)
    print(f"\n{'shape':<22} {'impl':<11} {'mode':<8} {'ms':>9} {'x floor':>8} {'vs fla':>7}")
    for r in rows:
        fla_ms = next((x["ms"] for x in rows if x["impl"] == "fla" and x["mode"] == r["mode"]
                       and x["shape"] == r["shape"]), None)
        vs = f"{fla_ms / r['ms']:.2f}x" if fla_ms else "-"
        print(f"{r['shape']:<22} {r['impl']:<11} {r['mode']:<8} {r['ms']:9.3f} {r['x_floor']:8.2f} {vs:>7}")
    if held:
        print(f"\n{'shape':<22} {'impl':<11} {'kept for the backward (MiB)':>28}")
        for h in held:
            print(f"{h['shape']:<22} {h['impl']:<11} {h['held_MiB']:28.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "rows": rows, "checks": checks, "held": held, "complete": True}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
