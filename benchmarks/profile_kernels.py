#!/usr/bin/env python3
"""Where one lasp_attention forward+backward spends its GPU time: every CUDA kernel (and memset / copy)
of a few profiled calls after warm-up, per call, beside the call's CUDA-event time.

Same inputs as bench_kernels.py (bf16, ALiBi-like decay, dO random; shapes BxHxNxD or BxHxNxDxE; `--gates`
its per-token log gates g = logsigmoid(x) / 16 with their gradient; `--qk-heads` its GVA: q and k with that
many heads, v and the output with H; `--docs K` its packed documents: each shape's rows as one row of K
documents, `cu_seqlens`; `--delta` the gated delta rule instead, as bench_delta.py times it:
gated_delta_attention(q, k, v, g, beta, layout="bnhd", use_qk_l2norm=True) with the gradients of all five). The gap between the event
time and the summed kernel time is time the GPU sat idle between kernels (host launches, allocation).
"Event time with the host ahead" times the same call behind a queued sleep kernel: what is left of the
gap there is launch latency, and the difference to the plain event time is host issue time on the GPU's
critical path (bench_kernels.py times each call from an idle GPU, so it includes that).

  python3 benchmarks/profile_kernels.py --shapes 4x32x8192x128,1x16x65536x128 --json prof.json
  python3 benchmarks/profile_kernels.py --gates --qk-heads 1 --shapes 2x80x16384x128x64
  python3 benchmarks/profile_kernels.py --docs 14 --shapes 4x32x8192x128   # dense row: --shapes 1x32x32768x128
  python3 benchmarks/profile_kernels.py --delta --shapes 4x32x8192x128
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import SHAPES, alibi_decay, bench, git_commit, library_id, packed_row  # noqa: E402
from bench_delta import make_set  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="e.g. 4x32x8192x128,1x16x65536x128 (default: bench_kernels' shapes)")
    ap.add_argument("--iters", type=int, default=5, help="profiled calls per shape")
    ap.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    ap.add_argument("--gates", action="store_true", help="per-token log gates (as bench_kernels.py --gates)")
    ap.add_argument("--qk-heads", type=int, default=0, help="q and k with this many heads (GVA), v and o with H")
    ap.add_argument("--docs", type=int, default=0, help="packed documents (as bench_kernels.py --docs)")
    ap.add_argument("--delta", action="store_true", help="the gated delta rule (as bench_delta.py)")
    ap.add_argument("--host", action="store_true",
                    help="also the host side: issue time per call and the top host events (ops, CUDA runtime calls)")
    ap.add_argument("--timeline", action="store_true",
                    help="also one call's host and device events in time order (offsets from the call's start)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    import lasp

    if args.delta and args.gates:
        raise SystemExit("profile_kernels.py: --delta has its own gates g; leave out --gates")

    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    dev = torch.device("cuda")
    info = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "commit": os.environ.get("LASP_COMMIT") or git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "mode": args.mode,
            "LASP_FWD_KERNEL": os.environ.get("LASP_FWD_KERNEL", "unset"),
            "LASP_BWD_KERNEL": os.environ.get("LASP_BWD_KERNEL", "unset"), "gates": args.gates,
            "qk_heads": args.qk_heads, "docs": args.docs, "op": "gated_delta_attention" if args.delta else
            "lasp_attention", **library_id()}
    print("# " + "  ".join(f"{k}={v}" for k, v in info.items()))
    out = []
    for shape in shapes:
        B, H, N, D = shape[:4]
        E = shape[4] if len(shape) > 4 else D
        if args.qk_heads and H % args.qk_heads:
            raise SystemExit(f"--qk-heads {args.qk_heads} must divide H = {H}")
        HQ = args.qk_heads or H
        cu = None
        if args.docs:
            B, N, cu = packed_row(B, N, args.docs)
            cu = cu.to(dev)
        bf = dict(device=dev, dtype=torch.bfloat16)
        decay, scale = alibi_decay(H, dev), 1.0 / math.sqrt(D)
        if args.delta:  # bench_delta.py's inputs: (B, N, H, .) tensors, g and beta (B, N, H) fp32
            (q, k, v, g, beta), do = make_set(B, H, HQ, N, D, E, torch.bfloat16, dev, 0)
            leaves = tuple(x.requires_grad_(True) for x in (q, k, v, g, beta))

            def op():
                return lasp.gated_delta_attention(q, k, v, g, beta, scale=scale, layout="bnhd", use_qk_l2norm=True,
                                                  cu_seqlens=cu)
        else:
            q, k = (torch.randn(B, HQ, N, D, **bf) for _ in range(2))
            v, do = (torch.randn(B, H, N, E, **bf) for _ in range(2))
            g = torch.nn.functional.logsigmoid(torch.randn(B, H, N, device=dev)) / 16 if args.gates else None
            leaves = tuple(x.requires_grad_(True) for x in (q, k, v) + ((g,) if g is not None else ()))

            def op():
                return lasp.lasp_attention(q, k, v, decay, g=g, scale=scale, cu_seqlens=cu)

        def call(_i=0):
            if args.mode == "fwd":
                with torch.no_grad():
                    op()
            else:
                torch.autograd.grad(op(), leaves, do)

        event_ms = bench(call, 1, warmup=3, reps=20)
        # The same call with the host ahead: a sleep kernel queued before the start event gives the host a
        # head start, so the events see the GPU's own time (kernels and launch gaps, no host issue time).
        # (4e6 cycles: about 2 ms at Hopper clocks, longer than the host needs to issue a call)
        queued_ms = bench(call, 1, warmup=0, reps=20, before=lambda: torch.cuda._sleep(4_000_000))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            call()
        issue_ms = (time.perf_counter() - t0) / 20 * 1e3  # host time to issue one call (GPU queue not full)
        torch.cuda.synchronize()
        acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.host else [])
        with profile(activities=acts) as prof:
            for _ in range(args.iters):
                call()
                torch.cuda.synchronize()  # as bench() does between its timed calls
        per = {}
        for e in prof.events():
            if e.device_type != DeviceType.CUDA:
                continue
            d = per.setdefault(e.name, [0.0, 0])
            d[0] += e.device_time / 1e3 / args.iters  # ms per call
            d[1] += 1
        total = sum(v[0] for v in per.values())
        print(f"\n## {'x'.join(map(str, shape))}{' gated delta rule' if args.delta else ''}"
              f"{' gates' if g is not None and not args.delta else ''}"
              f"{f' as one row of {N} tokens, {args.docs} documents' if args.docs else ''}"
              f"{f' qk-heads {HQ}' if HQ != H else ''} {args.mode}: event time {event_ms:.3f} ms, kernels {total:.3f} ms, "
              f"idle {event_ms - total:.3f} ms; host issue {issue_ms:.3f} ms/call; event time with the host "
              f"ahead {queued_ms:.3f} ms")
        print(f"{'ms/call':>8} {'share':>6} {'n/call':>6}  kernel")
        rows = []
        for name, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
            print(f"{ms:8.3f} {100 * ms / max(total, 1e-9):5.1f}% {n / args.iters:6.1f}  {name[:110]}")
            rows.append({"kernel": name, "ms_per_call": ms, "launches_per_call": n / args.iters})
        # GPU idle inside a call: gaps between consecutive device activities of the same call. Every call
        # issues the same activities, so the time-sorted list splits into `iters` equal runs.
        spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
        gaps = []
        per_call = len(spans) // args.iters if spans and len(spans) % args.iters == 0 else 0
        for c in range(args.iters if per_call else 0):
            run = spans[c * per_call:(c + 1) * per_call]
            for (s0, e0, n0), (s1, _, n1) in zip(run, run[1:]):
                if s1 - e0 > 1:  # us
                    gaps.append((s1 - e0, n0, n1))
        inside_ms = sum(g for g, _, _ in gaps) / 1e3 / args.iters
        print(f"idle between kernels inside a call {inside_ms:.3f} ms; before the first / after the last "
              f"kernel {event_ms - total - inside_ms:.3f} ms" + ("" if per_call else " (calls differ: not split)"))
        big = {}
        for gap, n0, n1 in gaps:
            key = (n0[:50], n1[:50])
            big[key] = big.get(key, 0.0) + gap / 1e3 / args.iters
        for (n0, n1), ms in sorted(big.items(), key=lambda kv: -kv[1])[:6]:
            print(f"{ms:8.3f} ms/call idle after {n0} before {n1}")
        host = []
        if args.host:
            cpu = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
            cpu.sort(key=lambda a: -a.self_cpu_time_total)
            print(f"{'host us/call':>12} {'n/call':>6}  host event (self time)")
            for a in cpu[:25]:
                us = a.self_cpu_time_total / args.iters
                print(f"{us:12.1f} {a.count / args.iters:6.1f}  {a.key[:100]}")
                host.append({"event": a.key, "self_us_per_call": us, "count_per_call": a.count / args.iters})
        timeline = []
        if args.timeline:
            # One call's host ops, CUDA runtime calls and device activities in time order: where the host
            # time before each launch goes, and when each kernel starts relative to the call.
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
                with torch.profiler.record_function("profile_kernels.call"):
                    call()
                torch.cuda.synchronize()
            evs = list(tprof.events())
            t0 = min((e.time_range.start for e in evs if e.name == "profile_kernels.call"), default=0)
            print(f"{'start us':>9} {'dur us':>8}  where  event (one call, from the call's start)")
            for e in sorted(evs, key=lambda e: e.time_range.start):
                if e.name == "profile_kernels.call" or "Synchronize" in e.name:
                    continue
                where = "gpu" if e.device_type == DeviceType.CUDA else "host"
                st, du = e.time_range.start - t0, e.time_range.end - e.time_range.start
                print(f"{st:9.1f} {du:8.1f}  {where:<5}  {e.name[:100]}")
                timeline.append({"start_us": st, "dur_us": du, "where": where, "event": e.name})
        out.append({"shape": list(shape), "timeline": timeline, "event_ms": event_ms, "kernel_ms": total, "issue_ms": issue_ms,
                    "queued_ms": queued_ms,
                    "idle_inside_ms": inside_ms,
                    "kernels": rows, "host": host})
        del q, k, v, do, g, leaves
        if args.delta:
            del beta
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "shapes": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
