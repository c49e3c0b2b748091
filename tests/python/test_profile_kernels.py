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
def test_profile_kernels_names_lasp_kernels(tmp_path):
    out = tmp_path / "prof.json"
    r = subprocess.run([sys.executable, SCRIPT, "--shapes", "1x2x1024x64", "--iters", "2", "--host", "--timeline", "--json",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    (shape,) = d["shapes"]
    assert shape["shape"] == [1, 2, 1024, 64]
    assert any("lasp::cuda" in k["kernel"] for k in shape["kernels"]), shape["kernels"]
    assert shape["kernel_ms"] > 0 and shape["event_ms"] > 0 and shape["queued_ms"] > 0
    gpu = [e for e in shape["timeline"] if e["where"] == "gpu"]
    assert any("lasp::cuda" in e["event"] for e in gpu), shape["timeline"]
