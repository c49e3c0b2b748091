#!/usr/bin/env python3
"""Times lasp's linear-attention kernels against flash-linear-attention and a plain PyTorch chunked form.

Forward and forward+backward, bf16, per shape B x H x N x D (E = D) or B x H x N x D x E, per-head decay:
  lasp        lasp.lasp_attention(q, k, v, decay, scale=...) (autograd op), when the package imports
  lasp-kern   the raw CUDA kernels (lasp::cuda::fwd / bwd) through a torch-free ctypes shim
              (benchmarks/kernels_shim.cpp), outputs and workspace preallocated
  fla         fla.ops.simple_gla.chunk_simple_gla(q, k, v, g_gamma=-decay, scale=...), layout (B, T, H, D)
  torch       a plain PyTorch chunked implementation (this file), autograd for the backward

CUDA events, warm-up, median of many, inputs rotated among sets larger than L2. Prints GPU, CUDA, torch
and commit; a table with ms, achieved GB/s (the floor's bytes over the time) and the memory floor
(fwd reads q, k, v and writes o; bwd reads q, k, v, do and writes dq, dk, dv; at the measured copy rate).
The head-dim shapes of the design's target (every D, E in {32, 64, 96, 128, 192, 256} on tensor cores):

  --shapes 2x16x8192x256,4x16x8192x32,4x16x8192x96,2x16x8192x192,4x16x8192x128x64,4x16x8192x256x64

--gates: per-token log gates g = logsigmoid(x) / 16 (fp32, (B, H, N)) on top of the decay, with their gradient:
lasp_attention(..., decay, g=g) against fla chunk_simple_gla(..., g=g - decay) (the same effective gates; the
plain-torch form and the raw-kernel shim have none and are skipped). fla 0.6.0 refuses its gated backward on
Hopper under Triton 3.4 to 3.7.0 (its issue 640: wrong gradients); this script lifts that refusal to time it
(its gradients are not used) and records so in the JSON ("fla_hopper_refusal_lifted").
The floor then also counts the read of g (forward and backward) and the write of dg.

--docs K: packed documents. Each shape's B rows of N tokens become one row of B * N tokens holding K
documents of random lengths (seed 0; at least one token each): lasp_attention(..., cu_seqlens=...) against
fla chunk_simple_gla(..., cu_seqlens=...), and "lasp-dense", the same row as one sequence (the cost of
packing is lasp's ratio to it). Without --gates also "lasp-starts": the packed call with LASP_DOC_STARTS=1
(the document starts run as such, README kernel options; "lasp" takes the default). fla's refusal is lifted
as for --gates (its varlen backward takes the same kernels). 14 documents in 4 x 8192 tokens:

  --docs 14 --shapes 4x32x8192x128

--qk-heads HQ: value-head groups (GVA, as Mamba-2's B and C shared by a group of heads): q and k have HQ
heads, v, the output and the gates H. lasp reads the shared heads in place; fla is given q and k repeated to
H heads (the repeat and the sum of their gradients are not timed), the plain-torch form and the shim are
skipped. The floor counts q, k, dq, dk at HQ heads. Mamba-2-2.7B's shape:

  --gates --qk-heads 1 --shapes 2x80x16384x128x64

  python3 benchmarks/bench_kernels.py --json bench.json --plot bench.png [--shim liblasp_shim.so]
"""
import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time

import torch

SHAPES = [(4, 32, 8192, 128), (1, 16, 65536, 128), (8, 16, 2048, 64)]


def packed_row(B, N, docs):
    """--docs: the B rows of N tokens as one row of B * N tokens holding `docs` documents of random lengths
    (seed 0, at least one token each). Returns 1, B * N and the int64 cu_seqlens on the CPU."""
    N = B * N
    if not 1 <= docs <= N:
        raise SystemExit(f"--docs: must be in 1..{N} (the row's tokens), got {docs}")
    cuts = torch.randperm(N - 1, generator=torch.Generator().manual_seed(0))[: docs - 1] + 1
    return 1, N, torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([N])]).to(torch.int64)


def alibi_decay(H, device):
    # ALiBi-like slopes, the rates lambda_h of docs/design.md (TransNormerLLM / Lightning Attention)
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# timing
def bench(fn, nsets, warmup=3, reps=20, before=None):
    """Median ms of fn(i) over reps calls, i rotating over nsets input sets (CUDA events). before: called
    ahead of each timed call's start event (e.g. to queue GPU work that gives the host a head start)."""
    for i in range(warmup):
        fn(i % nsets)
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        s.record()
        fn(r % nsets)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    """Device-to-device copy rate in bytes/s (bytes read + written), 1 GiB buffers."""
    n = 1 << 29
    a = torch.empty(n, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    a.normal_()
    ms = bench(lambda i: b.copy_(a), 1, warmup=3, reps=10)
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------
# lasp kernels through the ctypes shim
class Shim:
    DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.lasp_shim_workspace.restype = ctypes.c_size_t
        self.lib.lasp_shim_workspace.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
        self.lib.lasp_shim_call.restype = ctypes.c_int
        self.lib.lasp_shim_call.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_double,
                                            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                            ctypes.c_size_t, ctypes.c_void_p]

    def prepare(self, q, k, v, decay, scale):
        """q (B,H,N,D), k/v (B,Hkv,N,D|E) views; returns (fwd(), bwd(do)) closures with preallocated outputs."""
        B, H, N, D = q.shape
        Hkv, E = k.shape[1], v.shape[3]
        dims = (ctypes.c_int64 * 7)(self.DT[q.dtype], B, H, Hkv, N, D, E)
        o = torch.empty(B, H, N, E, dtype=q.dtype, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        wsf = torch.empty(max(1, self.lib.lasp_shim_workspace(0, dims)), dtype=torch.uint8, device=q.device)
        wsb = torch.empty(max(1, self.lib.lasp_shim_workspace(1, dims)), dtype=torch.uint8, device=q.device)
        keep = [o, dq, dk, dv, wsf, wsb]

        def call(which, do, ws):
            ts = [q, k, v, o, do if do is not None else o, dq, dk, dv]
            strides = (ctypes.c_int64 * 32)(*[s for t in ts for s in t.stride()])
            ptrs = (ctypes.c_void_p * 14)(decay.data_ptr() if decay is not None else None, *[t.data_ptr() for t in ts],
                                          None, None, None, None, ws.data_ptr())
            err = self.lib.lasp_shim_call(which, dims, scale, ptrs, strides, ws.numel(),
                                          ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
            if err != 0:
                raise RuntimeError(f"lasp kernel {which} failed with cudaError {err}")

        return (lambda: (call(0, None, wsf), o)[1]), (lambda do: (call(1, do, wsb), (dq, dk, dv))[1]), keep


# ----------------------------------------------------------------------------------------------
# plain PyTorch chunked implementation (bf16 matmuls, fp32 states), (B, H, N, D) layout
def torch_chunked(q, k, v, decay, scale, C=64):
    B, H, N, D = q.shape
    E = v.shape[-1]
    assert N % C == 0
    nc = N // C
    lam = decay.float().view(1, H, 1, 1)
    idx = torch.arange(C, device=q.device, dtype=torch.float32)
    diff = idx.view(C, 1) - idx.view(1, C)
    mask = torch.exp(-lam * diff.clamp(min=0)) * (diff >= 0)  # (1,H,C,C)
    qc, kc, vc = (x.view(B, H, nc, C, -1) for x in (q, k, v))
    A = (qc @ kc.transpose(-1, -2)) * (scale * mask.unsqueeze(2)).to(q.dtype)
    o = A @ vc
    wk = torch.exp(-lam * (C - 1 - idx)).view(1, H, 1, C, 1)
    kv = ((kc * wk.to(q.dtype)).transpose(-1, -2) @ vc).float()  # (B,H,nc,D,E)
    gC = torch.exp(-lam * C).view(1, H, 1, 1)
    S = torch.zeros(B, H, D, E, device=q.device, dtype=torch.float32)
    states = []
    for c in range(nc):
        states.append(S)
        S = gC * S + kv[:, :, c]
    Sx = torch.stack(states, dim=2).to(q.dtype)  # state before each chunk
    wq = (scale * torch.exp(-lam * (idx + 1))).view(1, H, 1, C, 1)
    o = o + (qc * wq.to(q.dtype)) @ Sx
    return o.view(B, H, N, E)


# ----------------------------------------------------------------------------------------------
def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("LASP_COMMIT", "unknown")


def library_id():
    """The compiled library the imported lasp loaded: its file name and the first 12 hex digits of its
    sha256, so that a result names the build it timed (a tree's .git can lag the build it runs)."""
    import hashlib

    from lasp import _ops

    path = _ops._LIBRARY
    if not path:
        return {}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"library": os.path.basename(path), "library_sha256": h.hexdigest()[:12]}


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--shim", default=os.environ.get("LASP_SHIM"), help="path of liblasp_shim.so (lasp-kern)")
    ap.add_argument("--shapes", default=None, help="e.g. 4x32x8192x128,1x16x65536x128,4x16x8192x128x64 (BxHxNxD[xE])")
    ap.add_argument("--impls", default="lasp,lasp-kern,fla,torch")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-decay", action="store_true")
    ap.add_argument("--gates", action="store_true", help="per-token log gates g (see above)")
    ap.add_argument("--docs", type=int, default=0,
                    help="packed documents (see above): the B rows of each shape as one row of this many documents")
    ap.add_argument("--qk-heads", type=int, default=0,
                    help="GVA (see above): q and k with this many heads, v and the output with H")
    ap.add_argument("--torch-max-chunks", type=int, default=256,
                    help="skip the plain-torch fwd+bwd beyond this many chunks per sequence (its Python loop is slow)")
    ap.add_argument("--from-json", default=None, help="only redraw --plot from an earlier --json (no GPU needed)")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            d = json.load(f)
        plot(d["rows"], d["info"], args.plot or "bench.png")
        return 0

    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    impls = args.impls.split(",")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = {
        "gpu": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda, "torch": torch.__version__,
        "commit": os.environ.get("LASP_COMMIT") or git_commit(),  # LASP_COMMIT: for a copy of the tree whose .git is not current (gpu_suite.sh sets it)
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        # the kernel choice asked for (the library reads these at first use; unset: its default)
        "LASP_FWD_KERNEL": os.environ.get("LASP_FWD_KERNEL", "unset"),
        "LASP_BWD_KERNEL": os.environ.get("LASP_BWD_KERNEL", "unset"),
    }
    lasp_mod = fla_fn = shim = None
    if "lasp" in impls:
        try:
            import lasp as lasp_mod  # noqa: F401

            info.update(library_id())
        except Exception as e:  # the package may not be built here
            print(f"# lasp package not importable ({type(e).__name__}: {e}); skipping 'lasp'")
            lasp_mod = None
    if "fla" in impls:
        try:
            from fla.ops.simple_gla import chunk_simple_gla as fla_fn
            import fla
            info["fla"] = getattr(fla, "__version__", "?")
            if args.gates or args.docs:
                import fla.ops.common.chunk_o as fla_chunk_o
                if getattr(fla_chunk_o, "IS_NVIDIA_HOPPER", False):
                    fla_chunk_o.IS_NVIDIA_HOPPER = False  # the refusal's switch (read at call time)
                    info["fla_hopper_refusal_lifted"] = True
        except Exception as e:
            print(f"# fla not importable ({type(e).__name__}: {e}); skipping 'fla'")
    if "lasp-kern" in impls and args.shim and not args.gates:
        shim = Shim(args.shim)
    info["gates"] = bool(args.gates)
    bw = copy_bandwidth()
    info["copy_GBps"] = bw / 1e9
    print("# " + "  ".join(f"{k}={v}" for k, v in info.items()))

    rows = []
    t_start = time.perf_counter()  # each row's line says when it came (a run under a time limit shows what took long)
    for shape in shapes:
        if len(shape) not in (4, 5):
            raise SystemExit(f"--shapes: expected BxHxNxD or BxHxNxDxE, got {'x'.join(map(str, shape))}")
        B, H, N, D = shape[:4]
        E = shape[4] if len(shape) == 5 else D
        cu = cu_cpu = None
        if args.docs:  # one row of B * N tokens, args.docs documents
            B, N, cu_cpu = packed_row(B, N, args.docs)
            cu = cu_cpu.to(dev)
        HQ = args.qk_heads or H
        if H % HQ != 0:
            raise SystemExit(f"--qk-heads: must divide the shape's heads {H}, got {HQ}")
        name = ("x".join(map(str, shape if E != D else shape[:4])) + (f"-qk{HQ}" if HQ != H else "")
                + (f"-docs{args.docs}" if args.docs else ""))
        elt = 2
        tok = B * H * N
        qk_tok = B * HQ * N
        bytes_fwd = (qk_tok * 2 * D + tok * 2 * E) * elt  # q, k, v read, o written
        bytes_bwd = (qk_tok * 4 * D + tok * 3 * E) * elt  # q, k, v, do read, dq, dk, dv written
        if args.gates:  # g read (fp32) by the forward and the backward, dg written
            bytes_fwd += tok * 4
            bytes_bwd += tok * 8
        floor = {"fwd": bytes_fwd, "fwd+bwd": bytes_fwd + bytes_bwd}
        scale = 1.0 / math.sqrt(D)
        decay = None if args.no_decay else alibi_decay(H, dev)
        one = tok * (2 * D + 2 * E) * elt
        nsets = max(2, min(4, int(math.ceil(200e6 / one))))  # > L2 in total
        sets = []
        for _ in range(nsets):
            q, k = (torch.randn(B, HQ, N, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
            v, do = (torch.randn(B, H, N, E, device=dev, dtype=torch.bfloat16) for _ in range(2))
            g = torch.nn.functional.logsigmoid(torch.randn(B, H, N, device=dev)) / 16 if args.gates else None
            sets.append((q, k, v, do, g))
        results = {}

        def record(impl, mode, ms):
            gbs = floor[mode] / (ms * 1e-3) / 1e9
            fl = floor[mode] / bw * 1e3
            rows.append({"shape": [B, H, N, D] + ([E] if E != D else []), "impl": impl, "mode": mode, "ms": ms, "GBps": gbs,
                         "floor_ms": fl, "x_floor": ms / fl, **({"qk_heads": HQ} if HQ != H else {}),
                         **({"docs": args.docs, "row": [B, N]} if args.docs else {})})
            # as it comes, so that a run cut short still leaves its numbers
            print(f"# {name} {impl:<10} {mode:<8} {ms:9.3f} ms {gbs:7.0f} GB/s  floor {fl:.3f} ms"
                  f"  [{time.perf_counter() - t_start:.0f} s]", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"info": info, "rows": rows, "complete": False}, f, indent=1)

        # ---- lasp raw kernels ----
        if shim is not None and HQ == H and not args.docs:
            preps = [shim.prepare(q, k, v, decay, scale) for (q, k, v, *_) in sets]
            record("lasp-kern", "fwd", bench(lambda i: preps[i][0](), nsets, reps=args.reps))
            record("lasp-kern", "fwd+bwd",
                   bench(lambda i: (preps[i][0](), preps[i][1](sets[i][3])), nsets, reps=args.reps))
            results["lasp-kern"] = preps[0][0]().clone()
            del preps
        # ---- lasp op ----
        if lasp_mod is not None:
            try:
                # (q, k, v[, g]) leaves, do
                gsets = [(tuple(x.detach().requires_grad_(True) for x in s[:3] + ((s[4],) if args.gates else ())),
                          s[3]) for s in sets]
                variants = [("lasp", cu, None)]
                if args.docs:
                    variants += ([] if args.gates else [("lasp-starts", cu, "1")]) + [("lasp-dense", None, None)]
                before = os.environ.get("LASP_DOC_STARTS")
                for impl, cus, starts in variants:
                    # read by the op (forward and backward) at every call
                    if starts is not None:
                        os.environ["LASP_DOC_STARTS"] = starts
                    elif before is None:
                        os.environ.pop("LASP_DOC_STARTS", None)
                    else:
                        os.environ["LASP_DOC_STARTS"] = before
                    f = lambda i, cus=cus: lasp_mod.lasp_attention(*gsets[i][0][:3], decay, scale=scale,  # noqa: E731
                                                                   g=gsets[i][0][3] if args.gates else None,
                                                                   cu_seqlens=cus)
                    with torch.no_grad():
                        record(impl, "fwd", bench(f, nsets, reps=args.reps))

                    def fb(i, f=f):
                        o = f(i)
                        torch.autograd.grad(o, gsets[i][0], gsets[i][1])
                    record(impl, "fwd+bwd", bench(fb, nsets, reps=args.reps))
                    if impl in ("lasp", "lasp-starts"):
                        with torch.no_grad():
                            results[impl] = f(0).detach().clone()
                if before is None:
                    os.environ.pop("LASP_DOC_STARTS", None)
                else:
                    os.environ["LASP_DOC_STARTS"] = before
                del gsets
            except Exception as e:
                print(f"# lasp op failed on {name}: {type(e).__name__}: {e}")
        # ---- fla, layout (B, T, H, D) ----
        if fla_fn is not None:
            g_gamma = -decay if decay is not None else torch.zeros(H, device=dev)

            def fla_gates(g):  # (B, T, H): the same effective log gates as lasp's g - decay
                lg = g.transpose(1, 2) - (decay if decay is not None else 0.0)
                return lg.contiguous().requires_grad_(True)
            # (q, k, v[, g]) leaves in (B, T, H, .), do
            rep = lambda x: x.repeat_interleave(H // x.shape[1], dim=1)  # noqa: E731 (GVA: q, k to H heads)
            tsets = [(tuple(rep(x).transpose(1, 2).contiguous().requires_grad_(True) for x in s[:3]) +
                      ((fla_gates(s[4]),) if args.gates else ()), s[3].transpose(1, 2).contiguous()) for s in sets]
            varlen = dict(cu_seqlens=cu, cu_seqlens_cpu=cu_cpu) if args.docs else {}
            if args.gates:
                f = lambda i: fla_fn(*tsets[i][0][:3], g=tsets[i][0][3], scale=scale, **varlen)[0]
            else:
                f = lambda i: fla_fn(*tsets[i][0][:3], g_gamma=g_gamma, scale=scale, **varlen)[0]
            with torch.no_grad():
                record("fla", "fwd", bench(f, nsets, reps=args.reps))

            def fb(i):
                o = f(i)
                torch.autograd.grad(o, tsets[i][0], tsets[i][1])
            record("fla", "fwd+bwd", bench(fb, nsets, reps=args.reps))
            with torch.no_grad():
                results["fla"] = f(0).detach().transpose(1, 2).contiguous()
            del tsets
        # ---- plain torch ----
        if "torch" in impls and not args.gates and HQ == H and not args.docs:
            lam = decay if decay is not None else torch.zeros(H, device=dev)
            try:
                gsets = [tuple(x.detach().requires_grad_(True) for x in s[:3]) + (s[3],) for s in sets[:2]]
                f = lambda i: torch_chunked(gsets[i][0], gsets[i][1], gsets[i][2], lam, scale)
                with torch.no_grad():
                    record("torch", "fwd", bench(f, 2, warmup=1, reps=max(3, args.reps // 4)))

                def fb(i):
                    o = f(i)
                    torch.autograd.grad(o, gsets[i][:3], gsets[i][3])
                if N // 64 <= args.torch_max_chunks:
                    record("torch", "fwd+bwd", bench(fb, 2, warmup=1, reps=max(3, args.reps // 4)))
                else:
                    print(f"# torch chunked fwd+bwd skipped at N={N} (> --torch-max-chunks chunks)")
                with torch.no_grad():
                    results["torch"] = f(0).detach()
                del gsets
            except torch.OutOfMemoryError:
                print(f"# torch chunked: out of memory at {name}")
            torch.cuda.empty_cache()
        # cross-check outputs of the implementations on input set 0
        ref = results.get("fla", results.get("torch"))
        if ref is not None:
            for kname, val in results.items():
                print(f"# {name} rel. diff {kname} vs {'fla' if 'fla' in results else 'torch'}: "
                      f"{rel(val, ref):.2e}")
        del sets, results
        torch.cuda.empty_cache()

    # ---- table ----
    print(f"\n{'shape (B,H,N,D[,E])':<20} {'impl':<10} {'mode':<8} {'ms':>9} {'GB/s':>8} {'floor ms':>9} {'x floor':>8}"
          f" {'vs fla':>7}")
    for r in rows:
        fla_ms = next((x["ms"] for x in rows if x["impl"] == "fla" and x["mode"] == r["mode"]
                       and x["shape"] == r["shape"]), None)
        sp = f"{fla_ms / r['ms']:.2f}x" if fla_ms else "-"
        print(f"{'x'.join(map(str, r['shape'])):<20} {r['impl']:<10} {r['mode']:<8} {r['ms']:9.3f} {r['GBps']:8.0f} "
              f"{r['floor_ms']:9.3f} {r['x_floor']:8.2f} {sp:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "complete": True}, f, indent=1)
    if args.plot:
        plot(rows, info, args.plot)


def plot(rows, info, path):
    """Bar chart (log scale) of ms per shape and implementation, with the memory floor, fwd and fwd+bwd."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        shapes = []
        for r in rows:
            if tuple(r["shape"]) not in shapes:
                shapes.append(tuple(r["shape"]))
        modes = ["fwd", "fwd+bwd"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = ["x".join(map(str, s)) for s in shapes]
        impl_names = sorted({r["impl"] for r in rows})
        for ax, mode in zip(axes, modes):
            w = 0.8 / max(1, len(impl_names))
            for j, im in enumerate(impl_names):
                ys = [next((r["ms"] for r in rows if r["impl"] == im and r["mode"] == mode
                            and tuple(r["shape"]) == s), float("nan")) for s in shapes]
                ax.bar([i + j * w for i in range(len(shapes))], ys, w, label=im)
            fl = [next((r["floor_ms"] for r in rows if r["mode"] == mode and tuple(r["shape"]) == s), float("nan"))
                  for s in shapes]
            centers = [i + 0.4 - w / 2 for i in range(len(shapes))]
            ax.scatter(centers, fl, color="k", marker="_", s=600, label="memory floor", zorder=3)
            ax.set_xticks(centers)
            ax.set_xticklabels(labels)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log scale, lower is better)")
            ax.set_title(f"{mode}, bf16, B x H x N x D, {info.get('gpu', '?')}")
            ax.legend(fontsize=8)
        fig.suptitle(f"lasp {info.get('commit', '?')}, fla {info.get('fla', '-')}, torch {info.get('torch', '?')}, "
                     f"{info.get('date', '')}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    except Exception as e:
        print(f"# plot failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
