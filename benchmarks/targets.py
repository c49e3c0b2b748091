#!/usr/bin/env python3
"""The project's speed targets against the benchmark records that measure them: one table, one JSON.

Reads the JSON files that `bash benchmarks/gpu_suite.sh targets` writes into a results folder (or any
records of the same scripts, named on the command line) and prints, per target, what it asks, what the
records measured, on which card, and whether it is met. The targets are set for one H200 and
measured side by side with fla in one run; on another card the ratios are printed but each target reads
"other card". Absolute times (the dense headline) are compared only on the card they were set for.

  python3 benchmarks/targets.py bench_out/                      # the folder gpu_suite.sh targets wrote
  python3 benchmarks/targets.py --dense a.json --gates b.json   # or each record by hand

Records (each optional; a target without its record reads "not measured"):
  --dense     bench_kernels.py --impls lasp,fla --shapes 4x32x8192x128,1x16x65536x128
  --headdims  bench_kernels.py --impls lasp,fla on the other head dims (2x16x8192x256, 4x16x8192x32, ...)
  --gates     bench_kernels.py --gates --impls lasp,fla --shapes 4x32x8192x128,1x16x65536x128
  --gva       bench_kernels.py --gates --qk-heads 1 --impls lasp,fla --shapes 2x80x16384x128x64
  --docs      bench_kernels.py --docs 14 --impls lasp,fla --shapes 4x32x8192x128
  --delta     bench_delta.py --impls lasp,fla --shapes 4x32x8192x128
"""
from __future__ import annotations

import argparse
import json
import os
import sys

CARD = "H200"  # the card the targets are set for
# The record files gpu_suite.sh's targets part writes, by record name.
FILES = {"dense": "targets_dense.json", "headdims": "targets_headdims.json", "gates": "targets_gates.json",
         "gva": "targets_gva.json", "docs": "targets_docs14.json", "delta": "targets_delta.json"}
HEADDIM_SHAPES = ["2x16x8192x256", "4x16x8192x32", "4x16x8192x96", "2x16x8192x192", "4x16x8192x128x64",
                  "4x16x8192x256x64"]


def _shape(s) -> str:
    """A record's shape ([B, H, N, D(, E)] or 'BxHxNxD(xE)') as 'BxHxNxD', with E only where it differs."""
    parts = [int(x) for x in (s.split("x") if isinstance(s, str) else s)]
    if len(parts) == 5 and parts[4] == parts[3]:
        parts = parts[:4]
    return "x".join(map(str, parts))


def _row(rec, shape, impl, mode="fwd+bwd"):
    for r in rec.get("rows", []):
        if _shape(r["shape"]) == shape and r["impl"] == impl and r["mode"] == mode and "ms" in r:
            return r
    return None


def _card(rec) -> str:
    info = rec.get("info", {})
    return info.get("gpu") or info.get("device") or "?"


# Each target: (issue area, what, record, shape, kind, value). kind "ms": lasp's fwd+bwd time at most value,
# on the target card only; "x_fla": fla's fwd+bwd time over lasp's at least value; "x_floor": lasp's fwd+bwd time
# over the memory floor at most value.
TARGETS = [
    ("redesign", "headline fwd+bwd <= 1.10 ms", "dense", "4x32x8192x128", "ms", 1.10),
    ("redesign", "headline fwd+bwd <= 1.31 ms", "dense", "1x16x65536x128", "ms", 1.31),
    *[("redesign", "no more than 1.2x slower than fla", "headdims", s, "x_fla", 1 / 1.2) for s in HEADDIM_SHAPES],
    ("gates", ">= 2.5x fla fwd+bwd", "gates", "4x32x8192x128", "x_fla", 2.5),
    ("gates", ">= 2.5x fla fwd+bwd", "gates", "1x16x65536x128", "x_fla", 2.5),
    ("gates", "<= 2x the memory floor (g, dg counted)", "gates", "4x32x8192x128", "x_floor", 2.0),
    ("gates", "<= 2x the memory floor (g, dg counted)", "gates", "1x16x65536x128", "x_floor", 2.0),
    ("gates", "GVA (Hq = Hk = 1) >= 2x fla fwd+bwd", "gva", "2x80x16384x128x64", "x_fla", 2.0),
    ("packed", "14 documents >= 3x fla fwd+bwd", "docs", "1x32x32768x128", "x_fla", 3.0),
    ("delta", ">= 2x fla fwd+bwd", "delta", "4x32x8192x128", "x_fla", 2.0),
]


def evaluate(records: dict) -> list:
    """One row per target: area, what, shape, card, measured (None where not), met ("yes", "no", "other card",
    "not measured")."""
    out = []
    for area, what, name, shape, kind, value in TARGETS:
        rec = records.get(name)
        row = {"area": area, "target": what, "shape": shape, "record": name, "kind": kind, "card": None,
               "measured": None, "met": "not measured"}
        out.append(row)
        if rec is None:
            continue
        row["card"] = _card(rec)
        lasp = _row(rec, shape, "lasp")
        if lasp is None:
            continue
        if kind == "ms":
            row["measured"] = lasp["ms"]
            ok = lasp["ms"] <= value
        elif kind == "x_floor":
            if "x_floor" not in lasp:
                continue
            row["measured"] = lasp["x_floor"]
            ok = lasp["x_floor"] <= value
        else:
            fla = _row(rec, shape, "fla")
            if fla is None:
                continue
            row["measured"] = fla["ms"] / lasp["ms"]
            ok = row["measured"] >= value
        row["met"] = ("yes" if ok else "no") if CARD in row["card"] else "other card"
    return out


def _fmt(row) -> str:
    m = row["measured"]
    if m is None:
        return "-"
    if row["kind"] == "ms":
        return f"{m:.3f} ms"
    return f"{m:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="a results folder holding the files gpu_suite.sh targets writes")
    for name in FILES:
        ap.add_argument(f"--{name}", help=f"the {name} record (default: FOLDER/{FILES[name]})")
    ap.add_argument("--json", help="write the table as JSON")
    args = ap.parse_args(argv)
    records = {}
    for name, fname in FILES.items():
        path = getattr(args, name) or (os.path.join(args.folder, fname) if args.folder else None)
        if path and os.path.exists(path):
            with open(path) as f:
                records[name] = json.load(f)
        elif getattr(args, name):
            raise SystemExit(f"targets: --{name}: no such file {path!r}")
    rows = evaluate(records)
    print(f"| area | target | shape | card | measured | met (on one {CARD}) |")
    print("| --- | --- | --- | --- | ---: | --- |")
    for r in rows:
        print(f"| {r['area']} | {r['target']} | {r['shape']} | {r['card'] or '-'} | {_fmt(r)} | {r['met']} |")
    print("(x fla: fla's forward+backward time over lasp's; x floor: lasp's over the memory floor; a headline time "
          f"counts on one {CARD} only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": CARD, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
