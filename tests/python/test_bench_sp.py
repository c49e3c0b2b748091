"""benchmarks/bench_sp.py runs end to end (gloo, 2 ranks, tiny shapes): its correctness check of every
method against the single-process op passes, and it writes the table's rows and the JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import REPO


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_bench_sp_smoke(tmp_path):
    out = tmp_path / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "benchmarks", "bench_sp.py"), "--device", "cpu", "--heads", "4", "--dim", "16",
           "--weak", "128", "--strong", "256", "--check-tokens", "96", "--reps", "2", "--warmup", "1",
           "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert {c["method"] for c in d["checks"]} == {"ring", "ring-peer", "allgather", "scan", "ulysses", "allgather-kv"}
    assert all(c["max_rel_err"] < 1e-4 for c in d["checks"]), d["checks"]
    got = {(r["scaling"], r["W"], r["method"]) for r in d["rows"] if "fwd_bwd_ms" in r}
    assert ("weak", 1, "single") in got and ("weak", 2, "ring") in got and ("strong", 2, "allgather") in got
    assert d["comm_floor"] and d["comm_floor"][0]["W"] == 2


def _gated_run(tmp_path, flag):
    """bench_sp.py with ``flag`` (--gates or --delta) on 2 gloo ranks: the methods that take per-token gates
    (ring, ring-peer, allgather, scan) and only those are checked against the single-process op (o and every
    input gradient) and timed. Returns the JSON."""
    out = tmp_path / "sp_gated.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "benchmarks", "bench_sp.py"), "--device", "cpu", "--heads", "4", "--dim", "16",
           "--weak", "128", "--strong", "", "--check-tokens", "96", "--reps", "2", "--warmup", "1", flag,
           "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert {c["method"] for c in d["checks"]} == {"ring", "ring-peer", "allgather", "scan"}
    assert all(c["max_rel_err"] < 1e-4 for c in d["checks"]), d["checks"]
    got = {(r["scaling"], r["W"], r["method"]) for r in d["rows"] if "fwd_bwd_ms" in r}
    assert got == {("weak", 1, "single"), ("weak", 2, "ring"), ("weak", 2, "ring-peer"), ("weak", 2, "allgather"),
                   ("weak", 2, "scan")}, got
    return d


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_bench_sp_gates_smoke(tmp_path):
    """--gates: per-token gates on lasp_attention (o, dq, dk, dv, dg checked)."""
    d = _gated_run(tmp_path, "--gates")
    assert d["info"]["gates"] is True and d["info"]["op"] == "lasp_attention"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_bench_sp_delta_smoke(tmp_path):
    """--delta: the gated delta rule (o and the gradients of q, k, v, g, beta checked)."""
    assert _gated_run(tmp_path, "--delta")["info"]["op"] == "gated_delta_attention"


def test_bench_sp_summary_scales_fla_cp_against_fla():
    """fla's context parallel (method fla-cp) is scaled against fla on one device, lasp's methods against
    lasp's: a weak-scaling efficiency of 0.5 for fla-cp here, 0.9 for the ring."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import bench_sp
    finally:
        sys.path.pop(0)
    row = lambda m, W, ms: {"scaling": "weak", "W": W, "n_local": 16, "n_total": 16 * W, "method": m,  # noqa: E731
                             "fwd_ms": ms / 3, "fwd_bwd_ms": ms}
    rows = [row("single", 1, 0.9), row("fla", 1, 2.0), row("ring", 2, 1.0), row("fla-cp", 2, 4.0)]
    s = {x["method"]: x for x in bench_sp.summarize(rows)}
    assert s["fla-cp"]["vs_single"] == pytest.approx(0.5)
    assert s["ring"]["vs_single"] == pytest.approx(0.9)
    assert s["fla-cp"]["ring_speedup"] == pytest.approx(4.0)
    assert s["fla"]["lasp_over_fla"] == pytest.approx(2.0 / 0.9)
