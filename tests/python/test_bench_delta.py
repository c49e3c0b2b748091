"""benchmarks/bench_delta.py runs (a CPU smoke run: its correctness check against the float64 recurrence,
its rows and JSON); the timings that matter are taken on GPUs."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_delta_cpu_smoke(tmp_path):
    out = tmp_path / "delta.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_delta.py"), "--device", "cpu",
           "--shapes", "1x2x130x16,1x4x70x8x12", "--qk-heads", "2", "--reps", "2", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["complete"] is True
    assert d["held"] == []  # the memory kept for the backward is counted on CUDA only
    assert {(c["shape"], c["impl"], c["vs"]) for c in d["checks"]} == {
        ("1x2x130x16", "lasp", "float64"), ("1x4x70x8x12-qk2", "lasp", "float64")}
    for c in d["checks"]:  # float32 against the float64 recurrence
        assert all(e < 1e-5 for e in c["rel_err"].values()), c
    assert {(x["shape"], x["impl"], x["mode"]) for x in d["rows"]} == {
        (s, "lasp", m) for s in ("1x2x130x16", "1x4x70x8x12-qk2") for m in ("fwd", "fwd+bwd")}
