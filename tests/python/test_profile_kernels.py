"""benchmarks/profile_kernels.py: on a machine without CUDA it refuses with a clear message; with CUDA it
profiles a small call and names lasp's kernels in its JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "profile_kernels.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal; this machine has CUDA")
def test_profile_kernels_refuses_without_cuda():
    r = subprocess.run([sys.executable, SCRIPT, "--shapes", "1x2x128x64"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "needs a CUDA device" in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="profile_kernels.py profiles CUDA kernels (no CUDA device here)")
@pytest.mark.parametrize("extra", [[], ["--gates"], ["--docs", "3"], ["--delta"], ["--delta", "--docs", "3"]],
                         ids=["plain", "gates", "docs", "delta", "delta-docs"])
def test_profile_kernels_names_lasp_kernels(tmp_path, extra):
    out = tmp_path / "prof.json"
    r = subprocess.run([sys.executable, SCRIPT, "--shapes", "1x2x1024x64", "--iters", "2", "--host", "--timeline", "--json",
                        str(out)] + extra, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    (shape,) = d["shapes"]
    assert shape["shape"] == [1, 2, 1024, 64]
    assert any("lasp::cuda" in k["kernel"] for k in shape["kernels"]), shape["kernels"]
    assert shape["kernel_ms"] > 0 and shape["event_ms"] > 0 and shape["queued_ms"] > 0
    gpu = [e for e in shape["timeline"] if e["where"] == "gpu"]
    assert any("lasp::cuda" in e["event"] for e in gpu), shape["timeline"]


def test_packed_row_of_bench_and_profile():
    """--docs K (bench_kernels.py, profile_kernels.py): B rows of N tokens become one row of B * N tokens holding
    K documents of at least one token each, the same cuts every time; K outside 1..B * N is refused."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from bench_kernels import packed_row
    finally:
        sys.path.pop(0)
    B, N, cu = packed_row(4, 96, 14)
    assert (B, N) == (1, 384) and cu.dtype == torch.int64 and len(cu) == 15
    assert cu[0] == 0 and cu[-1] == 384 and bool((cu[1:] > cu[:-1]).all())
    assert torch.equal(cu, packed_row(4, 96, 14)[2])
    assert packed_row(1, 5, 5)[2].tolist() == [0, 1, 2, 3, 4, 5]
    for bad in (0, 385):
        with pytest.raises(SystemExit, match="--docs: must be in 1..384"):
            packed_row(4, 96, bad)
