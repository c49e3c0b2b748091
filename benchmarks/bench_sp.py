#!/usr/bin/env python3
"""Sequence-parallel scaling of one lasp_attention call: LASP ring and all-gather vs two baselines.

Run under torchrun with the largest world size; smaller worlds W run on the subgroup of ranks 0..W-1
(the other ranks wait), so one launch measures W = 1, 2, 4:

  NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 4 benchmarks/bench_sp.py \
      --json sp.json --plot sp.png

Methods (all on the same local kernels, layout (B, tokens, H, D), bf16, ALiBi-like decay):
  single        W = 1: lasp_attention on one GPU (group=None); the weak-scaling reference
  ring          lasp_attention(..., group, strategy="ring")       (LASP: the state ring, NCCL send/recv)
  ring-peer     the same over the peer-memory transport (lasp.set_ring_transport("peer"))
  allgather     lasp_attention(..., group, strategy="allgather")  (LASP-2: one all-gather of states)
  scan          lasp_attention(..., group, strategy="scan")       (recursive-doubling scan, NCCL send/recv)
  ulysses       all-to-all tokens -> heads, the op over the whole sequence on H/W heads, all-to-all back
  allgather-kv  all-gather k and v (Megatron-SP style); each rank runs the op over its causal prefix

Weak scaling: fixed tokens per rank (n_local), W = 1, 2, 4. Strong scaling: fixed total length.
Times: forward and forward+backward of one call, CUDA events, each repetition aligned across ranks by
an all-reduce behind a sleep kernel (so host skew does not count), the slowest rank's time, median of
--reps. Before timing, every method's output and input gradients on a short sequence are compared with
the single-GPU op on the whole sequence.

--gates: per-token log gates g = logsigmoid(x) / 16 ((B, tokens, H), fp32, with their gradient) on top of the
decay, for the methods that take them (ring, ring-peer, allgather, scan: the two baselines do not).
--delta: the gated delta rule instead, lasp.gated_delta_attention(q, k, v, g, beta, use_qk_l2norm=True) with
g as for --gates (no decay) and beta = sigmoid(x) ((B, tokens, H), fp32, with gradients), for the methods that
take it (ring, ring-peer, allgather, scan); its weak-scaling target is 90% at W = 4 with 16K tokens per rank.
--fla (CUDA, W = 1): fla's chunk_simple_gla on the same inputs beside "single" (g_gamma = -decay, or
g = g - decay with --gates; with --delta its chunk_gated_delta_rule; fla 0.6.0 refuses its gated backward on
Hopper under Triton 3.4 to 3.7.0, its issue 640: the refusal is lifted to time it, and the JSON says so).
With --delta, --fla also adds the method "fla-cp" at W > 1: fla's own context parallel for that op
(chunk_gated_delta_rule(..., cp_context=build_cp_context(cu_seqlens=[0, W * tokens], group)), contiguous
pieces; it needs B = 1 and takes no initial or final state), checked and timed like lasp's methods; its
weak-scaling efficiency and strong-scaling speed-up are taken against the "fla" row at W = 1.

--device cpu (gloo) runs the same script on tiny shapes (wall-clock timing): a smoke test, not a benchmark.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_model import make_allgather_kv, make_ulysses  # noqa: E402  (the same baselines as the model benchmark)

METHODS = ["ring", "ring-peer", "allgather", "scan", "ulysses", "allgather-kv"]
GATED_METHODS = ["ring", "ring-peer", "allgather", "scan"]  # the methods that take per-token gates


def _import_lasp():
    import lasp

    return lasp


def alibi_decay(H, device):
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=device)


def make_method(lasp, name, group, delta=False):
    if name in ("single", "ring", "ring-peer", "allgather", "scan"):
        strategy = name if name in ("allgather", "scan") else "ring"
        grp = None if name == "single" else group
        transport = "peer" if name == "ring-peer" else "nccl"

        def attn(q, k, v, decay, scale, _g, lg=None, beta=None):
            lasp.set_ring_transport(transport)  # read by this call's forward and backward
            if delta:
                return lasp.gated_delta_attention(q, k, v, lg, beta, scale=scale, group=grp, layout="bnhd",
                                                  strategy=strategy, use_qk_l2norm=True)
            return lasp.lasp_attention(q, k, v, decay, scale=scale, group=grp, layout="bnhd", strategy=strategy,
                                       g=lg)

        return attn
    if name == "ulysses":
        return make_ulysses(lasp, group)
    if name == "allgather-kv":
        return make_allgather_kv(lasp, group)
    raise ValueError(f"unknown method {name!r}")


def call(attn, q, k, v, decay, scale, group, lg, beta=None):
    """A method on one rank's piece; the gates (and beta) only where there are (the baselines take none)."""
    if lg is None:
        return attn(q, k, v, decay, scale, group)
    return attn(q, k, v, decay, scale, group, lg=lg) if beta is None else attn(q, k, v, decay, scale, group, lg=lg,
                                                                                beta=beta)


def git_commit():
    if os.environ.get("LASP_COMMIT"):  # set by gpu_suite.sh: a copy of the tree may carry a .git that is not current
        return os.environ["LASP_COMMIT"]
    try:
        c = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


class Timer:
    """Per-repetition time of fn on this rank, the start aligned across the group on the device."""

    def __init__(self, device, group):
        self.device, self.group = device, group
        self.flag = torch.zeros(1, device=device)

    def __call__(self, fn, warmup, reps):
        times = []
        for i in range(warmup + reps):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda._sleep(2_000_000)  # ~1 ms: the host enqueues everything below before the GPU gets there
                dist.all_reduce(self.flag, group=self.group)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                t = s.elapsed_time(e)
            else:
                dist.barrier(group=self.group)
                t0 = time.perf_counter()
                fn()
                t = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(t)
        # The slowest rank's time per repetition, then the median over repetitions.
        tt = torch.tensor(times, dtype=torch.float64, device=self.device)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX, group=self.group)
        return statistics.median(tt.tolist())


def local_inputs(B, n, H, D, dtype, device, seed, requires_grad=True, gates=False, delta=False):
    """q, k, v, do (B, n, H, D), with gates (or delta) log gates lg (B, n, H) fp32 (else None), with delta
    beta (B, n, H) fp32 (else None)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda: torch.randn(B, n, H, D, generator=g, dtype=torch.float32).to(device, dtype)  # noqa: E731
    q, k, v, do = mk(), mk(), mk(), mk()
    gates = gates or delta
    lg = torch.nn.functional.logsigmoid(torch.randn(B, n, H, generator=g)).div(16).to(device) if gates else None
    beta = torch.sigmoid(torch.randn(B, n, H, generator=g)).to(device) if delta else None
    for t in (q, k, v, lg, beta):
        if t is not None:
            t.requires_grad_(requires_grad)
    return q, k, v, do, lg, beta


def lift_fla_hopper_refusal(fla_chunk_o):
    """fla 0.6.0 refuses its gated backward on Hopper under Triton 3.4 to 3.7.0 (its issue 640); the flag is
    read at call time. Returns whether it was lifted."""
    if getattr(fla_chunk_o, "IS_NVIDIA_HOPPER", False):
        fla_chunk_o.IS_NVIDIA_HOPPER = False
        return True
    return False


def fla_method(decay, delta=False):
    """fla's chunk_simple_gla (delta: chunk_gated_delta_rule) as a method (layout (B, T, H, D), as here), or
    None where fla does not import."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
        import fla.ops.common.chunk_o as fla_chunk_o
    except Exception as e:  # noqa: BLE001
        print(f"# fla not importable ({type(e).__name__}: {e}); no fla rows")
        return None, False
    lifted = lift_fla_hopper_refusal(fla_chunk_o)

    def attn(q, k, v, decay_, scale, _g, lg=None, beta=None):
        if delta:
            return chunk_gated_delta_rule(q, k, v, lg, beta, scale=scale, use_qk_l2norm_in_kernel=True)[0]
        if lg is None:
            return chunk_simple_gla(q, k, v, g_gamma=-decay_, scale=scale)[0]
        return chunk_simple_gla(q, k, v, g=lg - decay_, scale=scale)[0]

    return attn, lifted


def fla_cp_importable(rank):
    try:
        from fla.ops.cp import build_cp_context  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception as e:  # noqa: BLE001
        if rank == 0:
            print(f"# fla's context parallel not importable ({type(e).__name__}: {e}); no fla-cp rows")
        return False
    return True


def fla_cp_method(group, n_total, device):
    """fla's context-parallel chunk_gated_delta_rule on this rank's contiguous piece of a B = 1 row of n_total
    tokens (fla needs n_total divisible by the group's size), as a method."""
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.ops.cp import build_cp_context
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    lift_fla_hopper_refusal(fla_chunk_o)  # main() records it in the JSON through fla_method
    cu = torch.tensor([0, n_total], dtype=torch.int32)
    ctx = build_cp_context(cu_seqlens=cu.to(device), cu_seqlens_cpu=cu, group=group)

    def attn(q, k, v, decay_, scale, _g, lg=None, beta=None):
        return chunk_gated_delta_rule(q, k, v, lg, beta, scale=scale, use_qk_l2norm_in_kernel=True,
                                      cp_context=ctx)[0]

    return attn


def pick_method(lasp, name, group, args, n_total, device):
    """make_method, or fla's context parallel for the method "fla-cp"."""
    if name == "fla-cp":
        return fla_cp_method(group, n_total, device)
    return make_method(lasp, name, group, args.delta)


def check_methods(lasp, groups, methods, args, device, dtype, rank):
    """Every method's output and input gradients vs the single-device op on the whole sequence."""
    B, H, D = args.batch, args.heads, args.dim
    n = args.check_tokens
    decay = alibi_decay(H, device)
    scale = 1.0 / math.sqrt(D)
    results = []
    for W, group in groups.items():
        if W == 1:
            continue
        if rank < W:
            torch.manual_seed(0)
            full = [None if t is None else t.detach()
                    for t in local_inputs(B, W * n, H, D, dtype, device, seed=1234, gates=args.gates,
                                          delta=args.delta)]
            qf, kf, vf, dof, lgf, bf = (None if t is None else t.clone().requires_grad_(i != 3)
                                        for i, t in enumerate(full))
            of = call(make_method(lasp, "single", None, args.delta), qf, kf, vf, decay, scale, None, lgf, bf)
            of.backward(dof)
            want = [of.detach()] + [t.grad for t in (qf, kf, vf, lgf, bf) if t is not None]
            sl = slice(rank * n, (rank + 1) * n)
            for m in methods:
                q, k, v, do, lg, beta = (None if t is None else t[:, sl].clone().contiguous() for t in full)
                for t in (q, k, v, lg, beta):
                    if t is not None:
                        t.requires_grad_(True)
                o = call(pick_method(lasp, m, group, args, W * n, device), q, k, v, decay, scale, group, lg, beta)
                o.backward(do)
                got = [o.detach()] + [t.grad for t in (q, k, v, lg, beta) if t is not None]
                err = max(float((a.float() - b[:, sl].float()).norm() / b[:, sl].float().norm().clamp_min(1e-30))
                          for a, b in zip(got, want))
                e = torch.tensor([err], dtype=torch.float64, device=device)
                dist.all_reduce(e, op=dist.ReduceOp.MAX, group=group)
                results.append({"W": W, "method": m, "max_rel_err": float(e)})
        dist.barrier()
    return results


def comm_floor(groups, args, device, rank):
    """The state exchange of one forward+backward with no attention compute: the ring's two chains (each
    rank receives, adds, sends on) and the all-gather strategy's two all-gathers of (state, gamma^n)."""
    B, H, D = args.batch, args.heads, args.dim
    out = []
    for W, group in groups.items():
        if W == 1:
            continue
        if rank < W:
            s = torch.randn(B, H, D, D, device=device)
            r_in = torch.empty_like(s)
            pack = torch.cat([s.flatten(), torch.ones(H, device=device)])
            gathered = [torch.empty_like(pack) for _ in range(W)]
            timer = Timer(device, group)
            ranks = dist.get_process_group_ranks(group)

            def chain(forward):
                src = rank - 1 if forward else rank + 1
                dst = rank + 1 if forward else rank - 1
                x = s
                if 0 <= src < W:
                    dist.recv(r_in, ranks[src], group=group)
                    x = r_in + s
                if 0 <= dst < W:
                    dist.send(x, ranks[dst], group=group)

            def ring():
                chain(True)
                chain(False)

            def allgather():
                for _ in range(2):
                    dist.all_gather(gathered, pack, group=group)

            out.append({"W": W, "state_MiB": s.numel() * 4 / 2**20, "ring_ms": timer(ring, args.warmup, args.reps),
                        "allgather_ms": timer(allgather, args.warmup, args.reps)})
        dist.barrier()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--weak", default="16384,65536", help="tokens per rank for weak scaling (comma list)")
    ap.add_argument("--strong", default="65536,262144", help="total tokens for strong scaling (comma list)")
    ap.add_argument("--worlds", default=None, help="world sizes to measure (default: 1, 2, 4, ... up to the world)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--check-tokens", type=int, default=2048, help="tokens per rank of the correctness check")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None, help="only redraw --plot from an earlier --json")
    ap.add_argument("--gates", action="store_true", help="per-token log gates (see above)")
    ap.add_argument("--delta", action="store_true", help="the gated delta rule (see above)")
    ap.add_argument("--fla", action="store_true", help="fla's chunk_simple_gla beside 'single' at W = 1 (CUDA)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            d = json.load(f)
        plot(d, args.plot or "sp.png")
        return 0

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_sp: --device cuda but no CUDA device; use --device cpu for the smoke run")
    backend = "nccl" if cuda else "gloo"
    if "LOCAL_RANK" in os.environ and cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    lasp = _import_lasp()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"bench_sp: --methods: unknown method {m!r}; expected some of {METHODS}")
    if args.gates or args.delta:
        flag = "--delta" if args.delta else "--gates"
        dropped = [m for m in methods if m not in GATED_METHODS]
        methods = [m for m in methods if m in GATED_METHODS]
        if dropped and rank == 0:
            print(f"# {flag}: {', '.join(dropped)} take no per-token gates; measuring {', '.join(methods)}")
    if args.delta and args.fla and cuda and world > 1:
        if args.batch != 1:
            if rank == 0:
                print(f"# --fla: fla's context parallel needs B = 1 (--batch {args.batch}); no fla-cp rows")
        elif fla_cp_importable(rank):
            methods.append("fla-cp")
    if args.worlds:
        worlds = sorted({int(w) for w in args.worlds.split(",")})
    else:
        worlds = [w for w in (1, 2, 4, 8, 16) if w <= world]
    if any(w > world or w < 1 for w in worlds):
        raise SystemExit(f"bench_sp: --worlds {worlds}: every size must be between 1 and the world size {world}")
    groups = {}
    for W in worlds:  # every rank creates every subgroup, in the same order
        groups[W] = dist.new_group(list(range(W))) if W > 1 else dist.new_group([0])
    H, D, B = args.heads, args.dim, args.batch
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "world": world, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""), "decay": "alibi",
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"), "gates": bool(args.gates),
        "op": "gated_delta_attention" if args.delta else "lasp_attention",
    }
    fla_attn = None
    if args.fla and cuda:
        fla_attn, lifted = fla_method(alibi_decay(H, device), args.delta)
        info["fla_hopper_refusal_lifted"] = lifted
    if rank == 0:
        print("# " + "  ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    checks = check_methods(lasp, groups, methods, args, device, dtype, rank)
    if rank == 0:
        for c in checks:
            print(f"# check W={c['W']} {c['method']:<13} max rel err of o, dq, dk, dv vs one device: "
                  f"{c['max_rel_err']:.2e}", flush=True)
    bad = [c for c in checks if not c["max_rel_err"] < (2e-2 if dtype == torch.bfloat16 else 1e-4)]
    if bad:
        raise SystemExit(f"bench_sp: methods disagree with the single-device op: {bad}")

    comm = comm_floor(groups, args, device, rank)
    if rank == 0:
        for c in comm:
            print(f"# state exchange alone, W={c['W']}: ring forward+backward chains {c['ring_ms']:.3f} ms, "
                  f"two all-gathers {c['allgather_ms']:.3f} ms (state {c['state_MiB']:.2f} MiB)", flush=True)

    decay = alibi_decay(H, device)
    scale = 1.0 / math.sqrt(D)
    configs = [("weak", int(n), W) for n in args.weak.split(",") if n for W in worlds]
    configs += [("strong", int(N), W) for N in args.strong.split(",") if N for W in worlds if int(N) % W == 0]
    rows = []
    for kind, size, W in configs:
        n_local = size if kind == "weak" else size // W
        names = (["single"] + (["fla"] if fla_attn else [])) if W == 1 else \
            [m for m in methods if not (m == "ulysses" and H % W)]
        for name in names:
            row = {"scaling": kind, "W": W, "n_local": n_local, "n_total": n_local * W, "method": name}
            if rank < W:
                group = groups[W]
                q, k, v, do, lg, beta = local_inputs(B, n_local, H, D, dtype, device, seed=rank, gates=args.gates,
                                                     delta=args.delta)
                attn = fla_attn if name == "fla" else pick_method(lasp, name, group, args, n_local * W, device)
                timer = Timer(device, group)

                def fwd():
                    with torch.no_grad():
                        call(attn, q, k, v, decay, scale, group, lg, beta)

                def fwd_bwd():
                    for t in (q, k, v, lg, beta):
                        if t is not None:
                            t.grad = None
                    call(attn, q, k, v, decay, scale, group, lg, beta).backward(do)

                try:
                    row["fwd_ms"] = timer(fwd, args.warmup, args.reps)
                    row["fwd_bwd_ms"] = timer(fwd_bwd, args.warmup, args.reps)
                    if cuda:
                        row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                del q, k, v, do, lg, beta
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
            dist.barrier()
            if rank == 0:
                rows.append(row)
                print_row(row, rows)

    if rank == 0:
        summary = summarize(rows)
        print_table(rows, summary, info)
        out = {"info": info, "checks": checks, "comm_floor": comm, "rows": rows, "summary": summary}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        if args.plot:
            plot(out, args.plot)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items()) and "fwd_bwd_ms" in r), None)


def print_row(row, rows):
    if "error" in row:
        print(f"{row['scaling']:<6} W={row['W']} n_local={row['n_local']:>7} {row['method']:<13} {row['error']}",
              flush=True)
        return
    print(f"{row['scaling']:<6} W={row['W']} n_local={row['n_local']:>7} {row['method']:<13} "
          f"fwd {row['fwd_ms']:8.3f} ms  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms", flush=True)


def summarize(rows):
    """Weak-scaling efficiency (single at n_local / method at W) and the ring's speed-up over each baseline."""
    out = []
    for r in rows:
        if "fwd_bwd_ms" not in r or r["method"] == "single":
            continue
        s = {"scaling": r["scaling"], "W": r["W"], "n_local": r["n_local"], "method": r["method"]}
        ref = "fla" if r["method"] == "fla-cp" else "single"  # fla's context parallel scales against fla alone
        if r["scaling"] == "weak":
            base = _find(rows, scaling="weak", W=1, n_local=r["n_local"], method=ref)
        else:
            base = _find(rows, scaling="strong", W=1, n_total=r["n_total"], method=ref)
        if base and r["method"] == "fla":
            s["lasp_over_fla"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]  # how much faster lasp's single is
        elif base:
            s["vs_single"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]  # weak: efficiency; strong: speed-up
        ring = _find(rows, scaling=r["scaling"], W=r["W"], n_local=r["n_local"], method="ring")
        if ring and r["method"] != "ring":
            s["ring_speedup"] = r["fwd_bwd_ms"] / ring["fwd_bwd_ms"]
        out.append(s)
    return out


def print_table(rows, summary, info):
    print(f"\n# {info['device']} x{info['world']}, B={info['B']} H={info['H']} D={info['D']} {info['dtype']}, "
          f"{info['date']}, commit {info['commit']}")
    print("| scaling | W | tokens/rank | total | method | fwd ms | fwd+bwd ms | weak eff. / strong speed-up | "
          "ring speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "fwd_bwd_ms" not in r:
            print(f"| {r['scaling']} | {r['W']} | {r['n_local']} | {r['n_total']} | {r['method']} | "
                  f"{r.get('error', '-')} | | | |")
            continue
        s = next((x for x in summary if x["scaling"] == r["scaling"] and x["W"] == r["W"]
                  and x["n_local"] == r["n_local"] and x["method"] == r["method"]), {})
        vs = f"{s['vs_single']:.2f}" if "vs_single" in s else "-"
        if "lasp_over_fla" in s:
            vs = f"single {s['lasp_over_fla']:.2f}x faster"
        rs = f"{s['ring_speedup']:.2f}x" if "ring_speedup" in s else "-"
        print(f"| {r['scaling']} | {r['W']} | {r['n_local']} | {r['n_total']} | {r['method']} | {r['fwd_ms']:.3f} | "
              f"{r['fwd_bwd_ms']:.3f} | {vs} | {rs} |")


def plot(d, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"# plot skipped: matplotlib not importable ({e})")
        return
    rows, info = d["rows"], d["info"]
    kinds = [("weak", "n_local", "tokens per rank"), ("strong", "n_total", "total tokens")]
    sizes = {k: sorted({r[key] for r in rows if r["scaling"] == k}) for k, key, _ in kinds}
    panels = [(k, key, lab, s) for k, key, lab in kinds for s in sizes[k]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (kind, key, lab, size) in zip(axes[0], panels):
        for m in METHODS:
            pts = [(r["W"], r["fwd_bwd_ms"]) for r in rows if r["scaling"] == kind and r[key] == size
                   and (r["method"] == m or (r["W"] == 1 and r["method"] == "single")) and "fwd_bwd_ms" in r]
            if len(pts) > 1:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (W)")
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(f"{kind}: {lab} = {size // 1024}K", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"lasp_attention sequence parallel, {info['device']}, B={info['B']} H={info['H']} "
                 f"D={info['D']} {info['dtype']}, {info['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    code = main()
    _import_lasp().distributed._end_torchrun_process(code)
