"""benchmarks/bench_split.py without a GPU: its settings, the environment each process gets, the medians of its
table and its JSON, through a stand-in for the bench_kernels.py processes (the timings are taken on GPUs)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_split  # noqa: E402


def test_settings_and_counts():
    assert bench_split.settings([1, 8], [2]) == [
        ("auto", {}), ("fwd=1", {"LASP_FWD_SEGMENTS": "1"}), ("fwd=8", {"LASP_FWD_SEGMENTS": "8"}),
        ("bwd=2", {"LASP_BWD_SEGMENTS": "2"})]
    assert bench_split.settings([], [], [16]) == [
        ("auto", {}), ("both=16", {"LASP_FWD_SEGMENTS": "16", "LASP_BWD_SEGMENTS": "16"})]
    assert bench_split.counts("1, 2,8", "--fwd") == [1, 2, 8]
    assert bench_split.counts("", "--fwd") == []
    for bad in ("0", "a", "2,-1", ","):
        with pytest.raises(ValueError, match="--bwd must be a comma-separated list of positive integers"):
            bench_split.counts(bad, "--bwd")


def test_runs_one_process_per_setting_and_takes_medians(tmp_path):
    calls = []

    def fake_run(cmd, capture_output, text, env):
        calls.append((cmd, {k: env.get(k) for k in ("LASP_FWD_SEGMENTS", "LASP_BWD_SEGMENTS")}))
        out = cmd[cmd.index("--json") + 1]
        fwd = int(env.get("LASP_FWD_SEGMENTS", "4"))
        bwd = int(env.get("LASP_BWD_SEGMENTS", "4"))
        n = len(calls)  # a different time each round
        rows = [{"shape": [1], "impl": "lasp", "mode": "fwd", "ms": fwd + 0.1 * n},
                {"shape": [1], "impl": "lasp", "mode": "fwd+bwd", "ms": fwd + bwd + 0.1 * n},
                {"shape": [1], "impl": "fla", "mode": "fwd", "ms": 99.0}]
        with open(out, "w") as f:
            json.dump({"info": {"gpu": "stand-in", "commit": "abc"}, "rows": rows}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    js = tmp_path / "split.json"
    rows = bench_split.main(["--shapes", "2x3x256x64", "--fwd", "1,8", "--bwd", "2", "--both", "3", "--gates",
                             "--qk-heads", "1", "--rounds", "3", "--reps", "5", "--json", str(js)], run=fake_run)
    assert len(calls) == 15  # 3 rounds x 5 settings, alternating
    assert [c[1] for c in calls[:5]] == [
        {"LASP_FWD_SEGMENTS": None, "LASP_BWD_SEGMENTS": None}, {"LASP_FWD_SEGMENTS": "1", "LASP_BWD_SEGMENTS": None},
        {"LASP_FWD_SEGMENTS": "8", "LASP_BWD_SEGMENTS": None}, {"LASP_FWD_SEGMENTS": None, "LASP_BWD_SEGMENTS": "2"},
        {"LASP_FWD_SEGMENTS": "3", "LASP_BWD_SEGMENTS": "3"}]
    cmd = calls[0][0]
    assert "--gates" in cmd and cmd[cmd.index("--qk-heads") + 1] == "1" and cmd[cmd.index("--reps") + 1] == "5"
    assert cmd[cmd.index("--impls") + 1] == "lasp" and cmd[cmd.index("--shapes") + 1] == "2x3x256x64"
    by = {r["setting"]: r for r in rows}
    # the median over the rounds (calls 2, 7, 12 for fwd=1): 1 + 0.7
    assert by["fwd=1"]["fwd"] == pytest.approx(1.7) and by["fwd=1"]["fwd+bwd"] == pytest.approx(5.7)
    assert by["bwd=2"]["fwd+bwd"] == pytest.approx(4 + 2 + 0.9)
    assert by["both=3"]["fwd+bwd"] == pytest.approx(3 + 3 + 1.0)
    assert by["auto"]["rounds"] == 3
    d = json.loads(js.read_text())
    assert d["info"]["gpu"] == "stand-in" and d["info"]["rounds"] == 3 and d["info"]["gates"] is True
    assert len(d["runs"]) == 15 and len(d["rows"]) == 5


def test_a_failed_process_raises(tmp_path):
    def failing(cmd, capture_output, text, env):
        return subprocess.CompletedProcess(cmd, 1, "", "no CUDA device")

    with pytest.raises(RuntimeError, match="bench_kernels.py failed for 1x1x64x64.*no CUDA device"):
        bench_split.main(["--shapes", "1x1x64x64"], run=failing)


def test_bad_arguments_exit_with_a_message():
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_split.py"), "--shapes", "1x1x64x64",
                        "--fwd", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--fwd must be a comma-separated list of positive integers" in r.stderr
