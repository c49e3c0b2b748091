#!/usr/bin/env python3
"""Cost model of one lasp_attention layer's forward+backward under sequence parallelism, against the world
size W (weak scaling: n tokens per rank), for three ways of passing the states:

  ring       the chain of bench_sp.py's "ring": rank r waits for r hops, so the last rank's incoming
             state arrives after W - 1 hops, once forward and once backward;
  allgather  every rank gathers all W local states (NCCL's ring all-gather moves W - 1 states through
             each link) and combines them itself;
  scan       a recursive-doubling prefix scan (strategy "scan"): ceil(log2 W) rounds, each one state sent
             and one combine (T S + L), once forward and once backward; over nodes log2(g) rounds inside
             nodes, log2(W / g) across them and one more inside;
  pipelined  the ring with the state cut into P parts along heads, each part's main pass starting when it
             arrives (All-Scan, arXiv 2507.01004; modelled only): W - 1 hops of a part, then what the
             compute does not hide of the later parts, at the best P.

The model itself (its formulas, calibration and calibrated constants) is python/lasp/scaling.py, which
strategy="auto" also uses; this script prints its predictions, checks it and plots it.

Per call, T(W) = T1(n) + O + E(W): T1 the one-device time at n tokens, O the fixed cost of the split
(phase 1 of each direction, the exchange's set-up), E(W) the exposed exchange. Within a node a hop costs
h_intra; across nodes h_net = alpha_net + state_bytes / bw_net. Groups fill nodes of --gpus-per-node
ranks in order, so a ring crosses W / g - 1 node boundaries.

Calibration, from a bench_sp.py JSON (default: benchmarks/results/bench_sp_h200x4_2026-11-26c.json):
  T1(n)      its "single" rows (W = 1);
  h_intra    its "state exchange alone" ring chains: ring_ms / (2 (W - 1)) over the W it measured;
  allgather  the same record's two all-gathers alone: a + b (W - 1) fitted through its W points;
  O          per method, from the smallest W > 1 it measured (measured - T1 - E(W));
and checked against every larger W it measured (held out): the script prints the relative error and
exits 1 when one exceeds --tolerance (0.15). Nothing across nodes is measured yet: alpha_net and bw_net
are assumptions (--net-latency-us, --net-GBps; defaults for one 200 Gb/s NIC per GPU), and every
prediction past one node rests on them.

    python3 benchmarks/scaling_model.py --json bench_out/scaling_model.json --plot bench_out/scaling_model.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MEASURED = os.path.join(HERE, "results", "bench_sp_h200x4_2026-11-26c.json")


def _load_scaling():
    """lasp.scaling from this tree, by file: the model needs neither torch nor a build of lasp."""
    path = os.path.join(os.path.dirname(HERE), "python", "lasp", "scaling.py")
    spec = importlib.util.spec_from_file_location("lasp_scaling_model", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


scaling = _load_scaling()
STRATEGIES = scaling.STRATEGIES
Topology, Network = scaling.Topology, scaling.Network


def load(path):
    with open(path) as f:
        return json.load(f)


def calibrate(rec, n_local):
    """Model parameters from one bench_sp.py record at n_local tokens per rank (lasp.scaling.calibrate)."""
    try:
        return scaling.calibrate(rec, n_local)
    except ValueError as e:
        raise SystemExit(f"scaling_model: {e}") from None


def predict(strategy, W, p, g, net):
    """T(W) with the group filling nodes of g ranks in order."""
    return scaling.predict(strategy, Topology.filled(W, g), p, net)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", default=DEFAULT_MEASURED, help="a bench_sp.py --json record")
    ap.add_argument("--n-local", type=int, nargs="+", default=[16384, 65536], help="tokens per rank")
    ap.add_argument("--max-world", type=int, default=1024)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--net-latency-us", type=float, default=15.0, help="assumed: one inter-node message")
    ap.add_argument("--net-GBps", type=float, default=25.0, help="assumed: per-GPU network bandwidth")
    ap.add_argument("--tolerance", type=float, default=0.15, help="largest relative error on held-out points")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)

    rec = load(args.measured)
    worlds = [2 ** i for i in range(int(math.log2(args.max_world)) + 1)]
    out = dict(measured_file=os.path.relpath(args.measured, os.path.dirname(HERE)), assumptions=dict(
        gpus_per_node=args.gpus_per_node, net_latency_us=args.net_latency_us, net_GBps=args.net_GBps),
        checks=[], predictions=[])
    worst = 0.0
    net = Network(args.net_latency_us, args.net_GBps)
    info = rec["info"]
    for n in args.n_local:
        p = calibrate(rec, n)
        h_net = net.hop_ms(p["state_bytes"])
        print(f"# n_local={n}: T1 {p['t1']:.3f} ms, hop within a node {p['h_intra'] * 1e3:.1f} us, across nodes "
              f"{h_net * 1e3:.1f} us (assumed), all-gather alone {p['ag_a'] * 1e3:.1f} + {p['ag_b'] * 1e3:.1f} (W-1) us, "
              f"state {p['state_bytes'] / 2 ** 20:.2f} MiB ({info.get('device')}, {info.get('date')}, "
              f"commit {info.get('commit')})")
        for s in ("ring", "allgather"):
            pts = p["measured"].get(s, {})
            for W in sorted(pts)[1:]:  # held out: every W past the one O came from
                pred = predict(s, W, p, args.gpus_per_node, net)
                err = abs(pred - pts[W]) / pts[W]
                worst = max(worst, err)
                out["checks"].append(dict(n_local=n, strategy=s, W=W, measured_ms=pts[W], predicted_ms=pred, rel_err=err))
                print(f"check n_local={n:6d} {s:9s} W={W}: measured {pts[W]:.3f} ms, predicted {pred:.3f} ms, "
                      f"error {100 * err:.1f}%")
        print(f"\n{'n_local':>7} {'W':>5} " + " ".join(f"{s + ' ms':>13} {'eff':>5}" for s in STRATEGIES))
        for W in worlds:
            row = dict(n_local=n, W=W)
            cells = []
            for s in STRATEGIES:
                t = predict(s, W, p, args.gpus_per_node, net)
                row[s + "_ms"] = t
                row[s + "_weak_eff"] = p["t1"] / t
                cells.append(f"{t:13.3f} {p['t1'] / t:5.2f}")
            out["predictions"].append(row)
            print(f"{n:7d} {W:5d} " + " ".join(cells))
        print()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.n_local), figsize=(6 * len(args.n_local), 4.2), squeeze=False)
        for ax, n in zip(axes[0], args.n_local):
            rows = [r for r in out["predictions"] if r["n_local"] == n]
            for s in STRATEGIES:
                ax.plot([r["W"] for r in rows], [r[s + "_weak_eff"] for r in rows], marker="o", ms=3, label=s)
            for c in out["checks"]:
                if c["n_local"] == n:
                    t1 = calibrate(rec, n)["t1"]
                    ax.plot([c["W"]], [t1 / c["measured_ms"]], "kx")
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.05)
            ax.axvline(args.gpus_per_node, color="0.7", lw=0.8)
            ax.set_title(f"{n} tokens per rank (x: measured, held out)")
            ax.set_xlabel("world size W")
            ax.set_ylabel("weak-scaling efficiency T1 / T(W)")
            ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    ok = worst <= args.tolerance
    print(f"largest error on held-out measured points: {100 * worst:.1f}% ({'within' if ok else 'above'} "
          f"{100 * args.tolerance:.0f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
