"""benchmarks/targets.py: each speed target read from the records that measure it (met, not met, measured on
another card, not measured), from a results folder or from files named one by one."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "targets.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
try:
    import targets
finally:
    sys.path.pop(0)


def _rec(gpu, rows, key="gpu"):
    return {"info": {key: gpu}, "rows": [dict(shape=s, impl=i, mode=m, ms=ms, x_floor=xf) for s, i, m, ms, xf in rows]}


def _met(rows, shape, what):
    (r,) = [r for r in rows if r["shape"] == shape and r["target"].startswith(what)]
    return r["met"], r["measured"]


def test_targets_met_missed_other_card_and_unmeasured():
    recs = {
        # H200: headline 1.05 ms (met), 1.40 ms (missed; fla's rows do not count for an absolute target)
        "dense": _rec("NVIDIA H200", [([4, 32, 8192, 128], "lasp", "fwd+bwd", 1.05, 1.4),
                                      ([1, 16, 65536, 128], "lasp", "fwd+bwd", 1.40, 1.9),
                                      ([1, 16, 65536, 128], "lasp", "fwd", 0.40, 1.5),
                                      ([1, 16, 65536, 128], "fla", "fwd+bwd", 6.0, 8.0)]),
        # H200 gates: 3x fla (met) but 2.2x the floor (missed) at one shape; the other shape has no fla row
        "gates": _rec("NVIDIA H200", [([4, 32, 8192, 128], "lasp", "fwd+bwd", 2.0, 2.2),
                                      ([4, 32, 8192, 128], "fla", "fwd+bwd", 6.0, 6.6),
                                      ([1, 16, 65536, 128], "lasp", "fwd+bwd", 2.5, 1.9)]),
        # an H100 record: ratios shown, no verdict
        "delta": _rec("NVIDIA H100 80GB HBM3", [("4x32x8192x128", "lasp", "fwd+bwd", 4.0, 5.0),
                                                ("4x32x8192x128", "fla", "fwd+bwd", 9.0, 11.0)], key="device"),
        # 5-d shapes with E = D are the 4-d ones; E != D stays
        "headdims": _rec("NVIDIA H200", [([2, 16, 8192, 256, 256], "lasp", "fwd+bwd", 2.5, 7.0),
                                         ([2, 16, 8192, 256, 256], "fla", "fwd+bwd", 2.9, 8.0),
                                         ([4, 16, 8192, 256, 64], "lasp", "fwd+bwd", 3.0, 3.0),
                                         ([4, 16, 8192, 256, 64], "fla", "fwd+bwd", 2.4, 2.0)]),
    }
    rows = targets.evaluate(recs)
    assert len(rows) == len(targets.TARGETS)
    assert _met(rows, "4x32x8192x128", "headline") == ("yes", 1.05)
    assert _met(rows, "1x16x65536x128", "headline") == ("no", 1.40)
    assert _met(rows, "4x32x8192x128", ">= 2.5x") == ("yes", pytest.approx(3.0))
    assert _met(rows, "4x32x8192x128", "<= 2x the memory floor") == ("no", 2.2)
    assert _met(rows, "1x16x65536x128", ">= 2.5x") == ("not measured", None)
    assert _met(rows, "1x16x65536x128", "<= 2x the memory floor") == ("yes", 1.9)
    assert _met(rows, "4x32x8192x128", ">= 2x fla") == ("other card", pytest.approx(2.25))
    assert _met(rows, "2x16x8192x256", "no more than") == ("yes", pytest.approx(2.9 / 2.5))
    assert _met(rows, "4x16x8192x256x64", "no more than") == ("no", pytest.approx(0.8))
    assert _met(rows, "2x80x16384x128x64", "GVA") == ("not measured", None)
    assert _met(rows, "1x32x32768x128", "14 documents") == ("not measured", None)


def test_targets_cli_reads_a_folder_and_writes_json(tmp_path):
    rec = _rec("NVIDIA H200", [([1, 32, 32768, 128], "lasp", "fwd+bwd", 1.2, 1.3),
                               ([1, 32, 32768, 128], "fla", "fwd+bwd", 4.2, 4.5)])
    (tmp_path / targets.FILES["docs"]).write_text(json.dumps(rec))
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--json", str(out)], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "| packed | 14 documents >= 3x fla fwd+bwd | 1x32x32768x128 | NVIDIA H200 | 3.50x | yes |" in r.stdout
    d = json.loads(out.read_text())
    assert d["card"] == "H200" and sum(x["met"] == "not measured" for x in d["rows"]) == len(targets.TARGETS) - 1
    r = subprocess.run([sys.executable, SCRIPT, "--gates", str(tmp_path / "missing.json")], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode != 0 and "--gates: no such file" in r.stderr
