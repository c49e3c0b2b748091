"""The README's demo command (examples/run_demo.sh, whose engine is examples/train.py) and the bare-op demo
(examples/demo.py), run as they are documented, on the CPU (Gloo; NCCL where the machine has the GPUs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def _run(cmd, timeout=240, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", **env)
    try:
        return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as ex:
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{ex.stdout}\n{ex.stderr}")


def test_run_demo_sh(tmp_path):
    """bash examples/run_demo.sh (install skipped: the suite runs after it): sp=1 and sp=2 runs of train.py,
    the same curve, a verdict, the JSON and the plot."""
    out = tmp_path / "demo"
    r = _run(["bash", "examples/run_demo.sh", "--steps", "12", "--no-progress"], LASP_SKIP_INSTALL="1",
             DEMO_OUT=str(out))
    assert r.returncode == 0, r.stdout[-4000:] + "\n--- stderr (tail) ---\n" + r.stderr[-4000:]
    assert "convergence check: sp=1 vs sp=2 over 12 steps" in r.stdout and "-> OK" in r.stdout, r.stdout[-2000:]
    with open(out / "convergence.json") as f:
        rec = json.load(f)
    assert rec["ok"] and rec["sp"] == 2 and set(rec["losses"]) == {"sp1", "sp2"}
    a, b = rec["losses"]["sp1"], rec["losses"]["sp2"]
    assert len(a) == len(b) == 12
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b))
    assert a[-1] < a[0], f"the demo's loss does not fall: {a}"
    assert (out / "convergence.png").stat().st_size > 0


def test_demo_py_split_matches_unsplit():
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "examples/demo.py", "--steps", "3"])
    assert r.returncode == 0, r.stdout[-4000:] + "\n--- stderr (tail) ---\n" + r.stderr[-4000:]
    assert "2 ranks: largest relative loss difference" in r.stdout and "-> OK" in r.stdout, r.stdout
    assert r.stdout.count("step ") == 3


def test_demo_py_reports_a_mismatch():
    """A tolerance below float32 rounding makes the comparison fail: the check is live."""
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "examples/demo.py", "--steps", "3", "--tolerance", "1e-12"])
    assert r.returncode != 0 and "-> MISMATCH" in r.stdout, r.stdout[-2000:]


def test_gpu_suite_models_findmax_smoke(tmp_path):
    """benchmarks/gpu_suite.sh models on the CPU (SMOKE=1), only its step d: every method searched up to the
    cap, the summary's table and its longest-run line, which says when the cap (not memory) ended the search."""
    out = tmp_path / "dm"
    skip = {k: "0" for k in ("CONV_S", "BENCH_S", "BENCH_BF16_S", "BENCH_EAGER_S", "PROBE_S", "PROBE_OFFLOAD_S")}
    r = _run(["bash", "benchmarks/gpu_suite.sh", "models"], SMOKE="1", LASP_RESULTS_DIR=str(out), **skip)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    with open(out / "findmax.json") as f:
        rec = json.load(f)
    assert rec["find_max"] and set(rec["max_seq_len"]) == {"lasp", "lasp-allgather", "ulysses", "allgather-kv"}
    assert all(v == 256 for v in rec["max_seq_len"].values()), rec["max_seq_len"]
    summary = (out / "summary.md").read_text()
    assert "## d. Longest sequence per method" in summary
    assert "longest run: lasp 256 (the search's cap, no out-of-memory)" in summary, summary[-1500:]


def test_gpu_suite_arguments(tmp_path):
    """gpu_suite.sh lists its parts in --help, refuses unknown parts, and refuses a GPU part where there are
    too few GPUs with a message naming the part (checked before anything is built or run)."""
    r = _run(["bash", "benchmarks/gpu_suite.sh", "--help"])
    assert r.returncode == 0 and "parts (GPUs needed):" in r.stdout, r.stdout + r.stderr
    for part in ("gtest", "pytest", "demo", "kernels", "ab", "sp", "models", "reliability", "groupchecks", "hf",
                 "hf-example", "sanitize", "ncu", "pending", "delta", "split", "targets"):
        assert f"\n  {part} " in r.stdout, part
    r = _run(["bash", "benchmarks/gpu_suite.sh", "no-such-part"])
    assert r.returncode == 2 and "unknown part 'no-such-part'" in r.stderr, r.stderr
    # no nvidia-smi on PATH: no GPUs, whatever the machine has
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "grep", "sed"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    r = _run([shutil.which("bash"), "benchmarks/gpu_suite.sh", "gtest", "sp"], PATH=str(bin_dir))
    assert r.returncode == 2 and "part 'gtest' needs at least 1 CUDA GPU(s); found 0" in r.stderr, r.stderr
