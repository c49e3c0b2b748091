"""Times the CUDA op at forced segment splits against the plan's own choice.

Each (b, h) sequence is cut into segments on one device where B x H blocks do not fill the GPU
(kernels/DESIGN.md, "Phases and plans"; the choice is segments_for in kernels/plan.h). This script runs
benchmarks/bench_kernels.py (lasp only) once per setting, each in its own process (the library reads
LASP_FWD_SEGMENTS / LASP_BWD_SEGMENTS at its first call), alternating the settings over --rounds, and prints
per shape and setting the median over rounds of bench_kernels' forward and forward+backward medians:

  auto          the plan's choice for both directions
  fwd=S         the forward forced to S segments, the backward at the plan's choice
  bwd=S         the backward forced to S segments, the forward at the plan's choice
  both=S        both forced to S segments (the backward then takes the forward's kept segment states)

    python3 benchmarks/bench_split.py --gates --shapes 2x24x16384x128 --fwd 1,2,8 --bwd 2,8 --rounds 2

--qk-heads and --gates are passed through (GVA: --qk-heads 1). Needs a CUDA device with the lasp package
(the splits are the CUDA kernels'); the JSON holds every process's rows.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def settings(fwd, bwd, both=()):
    """[(name, env)] in the order run: auto first, then each forced forward count, each backward one, and
    each count forced on both."""
    out = [("auto", {})]
    out += [(f"fwd={s}", {"LASP_FWD_SEGMENTS": str(s)}) for s in fwd]
    out += [(f"bwd={s}", {"LASP_BWD_SEGMENTS": str(s)}) for s in bwd]
    out += [(f"both={s}", {"LASP_FWD_SEGMENTS": str(s), "LASP_BWD_SEGMENTS": str(s)}) for s in both]
    return out


def counts(text, flag):
    """'1,2,8' -> [1, 2, 8]: positive integers, or a ValueError naming the flag."""
    if not text:
        return []
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = [0]
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{flag} must be a comma-separated list of positive integers, got {text!r}")
    return vals


def bench_once(shape, env, args, run=subprocess.run):
    """One bench_kernels.py process for one shape under env: ({mode: ms}, its info: card, commit, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "b.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_kernels.py"), "--impls", "lasp", "--reps", str(args.reps),
               "--shapes", shape, "--json", out]
        if args.gates:
            cmd.append("--gates")
        if args.qk_heads:
            cmd += ["--qk-heads", str(args.qk_heads)]
        r = run(cmd, capture_output=True, text=True, env=dict(os.environ, **env))
        if r.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"bench_kernels.py failed for {shape} under {env}: {(r.stdout + r.stderr)[-2000:]}")
        with open(out) as f:
            d = json.load(f)
    return {row["mode"]: row["ms"] for row in d["rows"] if row["impl"] == "lasp"}, d.get("info", {})


def table(results):
    """results: {(shape, setting): [{mode: ms}, ...]} -> [row dicts] with the median over rounds per mode."""
    rows = []
    for (shape, name), runs in results.items():
        row = {"shape": shape, "setting": name, "rounds": len(runs)}
        for mode in ("fwd", "fwd+bwd"):
            vals = [r[mode] for r in runs if mode in r]
            row[mode] = statistics.median(vals) if vals else None
        rows.append(row)
    return rows


def main(argv=None, run=subprocess.run):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", required=True, help="BxHxNxD[xE], comma-separated")
    ap.add_argument("--fwd", default="", help="forward segment counts to force, e.g. 1,2,8")
    ap.add_argument("--bwd", default="", help="backward segment counts to force, e.g. 1,2,8")
    ap.add_argument("--both", default="", help="segment counts to force on both directions, e.g. 8,16")
    ap.add_argument("--gates", action="store_true", help="per-token gates (bench_kernels.py --gates)")
    ap.add_argument("--qk-heads", type=int, default=0, help="q / k heads (GVA), as bench_kernels.py")
    ap.add_argument("--reps", type=int, default=20, help="bench_kernels.py --reps")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the settings, alternating")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        todo = settings(counts(args.fwd, "--fwd"), counts(args.bwd, "--bwd"), counts(args.both, "--both"))
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1 or args.reps < 1:
        ap.error(f"--rounds and --reps must be >= 1, got {args.rounds} and {args.reps}")
    shapes = [s for s in args.shapes.split(",") if s]
    results, info = {}, {}
    for _ in range(args.rounds):
        for shape in shapes:
            for name, env in todo:
                ms, inf = bench_once(shape, env, args, run)
                info = info or inf
                results.setdefault((shape, name), []).append(ms)
    print("# " + "  ".join(f"{k}={info[k]}" for k in ("gpu", "commit", "date", "torch") if k in info))
    rows = table(results)
    print(f"\n{'shape':<22} {'setting':<10} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for r in rows:
        f = "-" if r["fwd"] is None else f"{r['fwd']:.3f}"
        fb = "-" if r["fwd+bwd"] is None else f"{r['fwd+bwd']:.3f}"
        print(f"{r['shape']:<22} {r['setting']:<10} {f:>9} {fb:>11}")
    if args.json:
        info = dict(info, gates=args.gates, qk_heads=args.qk_heads, reps=args.reps, rounds=args.rounds)
        runs = [{"shape": s, "setting": n, "ms": ms} for (s, n), v in results.items() for ms in v]
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "runs": runs}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
