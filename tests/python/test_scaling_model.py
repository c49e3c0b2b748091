"""benchmarks/scaling_model.py: the cost model reproduces the held-out measured points of its record, and
its predictions behave as the strategies' hop counts say."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("scaling_model", os.path.join(ROOT, "benchmarks", "scaling_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_matches_held_out_measurements(model, tmp_path):
    out = tmp_path / "m.json"
    rc = model.main(["--json", str(out), "--max-world", "256"])
    rec = json.loads(out.read_text())
    assert rec["checks"], "no held-out measured point was checked"
    for c in rec["checks"]:
        assert c["rel_err"] <= 0.15, c
    assert rc == 0


def test_model_fails_on_a_point_it_cannot_match(model, tmp_path):
    """A record whose W = 4 time is doubled must be reported (exit status 1), not absorbed."""
    rec = json.load(open(model.DEFAULT_MEASURED))
    for r in rec["rows"]:
        if r["scaling"] == "weak" and r["W"] == 4 and r["method"] == "ring":
            r["fwd_bwd_ms"] *= 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rec))
    assert model.main(["--measured", str(bad), "--max-world", "8"]) == 1


def test_predictions_follow_hop_counts(model):
    rec = json.load(open(model.DEFAULT_MEASURED))
    p = model.calibrate(rec, 16384)
    h_net = 0.057
    prev = {}
    for W in [1, 2, 4, 8, 16, 64, 256, 1024]:
        for s in model.STRATEGIES:
            t = model.predict(s, W, p, 8, h_net)
            assert t >= p["t1"] - 1e-12 or W > 1
            if s in prev:
                assert t >= prev[s] - 1e-12, (s, W)  # more ranks never predict less time
            prev[s] = t
        # within one node the ring's chain is W - 1 hops each way
        if 1 < W <= 8:
            assert math.isclose(model.exchange_ms("ring", W, p, 8, h_net), 2 * (W - 1) * p["h_intra"])
    # the scan's rounds grow with log2(W), the ring's hops with W
    assert model.exchange_ms("scan", 1024, p, 8, h_net) < model.exchange_ms("ring", 1024, p, 8, h_net) / 10
