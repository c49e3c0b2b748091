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
    S = model.scaling
    net = S.Network()
    prev = {}
    for W in [1, 2, 4, 8, 16, 64, 256, 1024]:
        topo = S.Topology.filled(W, 8)
        for s in model.STRATEGIES:
            t = S.predict(s, topo, p, net)
            assert t >= p["t1"] - 1e-12 or W > 1
            if s in prev:
                assert t >= prev[s] - 1e-12, (s, W)  # more ranks never predict less time
            prev[s] = t
        # within one node the ring's chain is W - 1 hops each way
        if 1 < W <= 8:
            assert math.isclose(S.exchange_ms("ring", topo, p, net), 2 * (W - 1) * p["h_intra"])
    # the scan's rounds grow with log2(W), the ring's hops with W
    big = S.Topology.filled(1024, 8)
    assert S.exchange_ms("scan", big, p, net) < S.exchange_ms("ring", big, p, net) / 10


def test_package_constants_are_the_records_calibration(model):
    """lasp.scaling carries the constants calibrate() derives from the default record, so that the library's
    choice and the saved results of this script rest on the same numbers."""
    rec = json.load(open(model.DEFAULT_MEASURED))
    assert set(model.scaling.CALIBRATIONS) == {16384, 65536}
    for n, want in model.scaling.CALIBRATIONS.items():
        assert model.calibrate(rec, n) == want, n


def test_peer_ring_matches_its_held_out_point(model):
    """The ring over peer memory (hop from bench_hop.py, fixed cost from the W = 2 run) predicts W = 4."""
    S = model.scaling
    for n, p in S.CALIBRATIONS.items():
        pred = S.predict("ring", S.Topology.filled(4, 8), p, transport="peer")
        meas = p["measured"]["ring-peer"][4]
        assert abs(pred - meas) / meas <= 0.15, (n, pred, meas)


def test_node_layouts(model):
    T = model.scaling.Topology
    assert T.filled(20, 8) == T(20, 3, 2, 8)
    assert T.from_hosts(["a"] * 8 + ["b"] * 8 + ["c"] * 4) == T(20, 3, 2, 8)
    assert T.from_hosts(["a", "b", "a", "b"]) == T(4, 2, 3, 2)  # interleaved: every ring hop crosses
    assert T.from_hosts(["a"]) == T(1)
    with pytest.raises(ValueError):
        T(4, 1, 0, 2)  # 4 ranks cannot sit on one node of at most 2
