"""Head maps: q, k and v with three head counts (GVA: Hq = Hk < Hv, as Mamba-2's shared B and C), on CPU.

Output head h reads q head h // (H / Hq), k head h // (H / Hk) and v head h // (H / Hv), H = max(Hq, Hv).
Checked against the float64 token-by-token recurrence (reference.gated_recurrent_grads, which expands and
reduces heads itself), single process (fixed cases and a hypothesis property over head maps, lengths and
gates) and across Gloo ranks. On CUDA tensors: test_gates_cuda.py.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_close_to_ref, gen, randn, ref, spawn_world

F32, F64 = torch.float32, torch.float64

# (B, Hq, Hk, Hv, N, D, E): GVA (Mamba-2-like), GVA with grouped q/k, mixed groups whose k and v blocks are
# not nested (H = 6: k blocks of 3, v blocks of 2), plain GQA / MQA for contrast
HEAD_MAPS = [
    (2, 1, 1, 4, 130, 5, 7),
    (1, 2, 2, 6, 70, 8, 8),
    (1, 2, 1, 4, 65, 6, 3),
    (2, 6, 2, 3, 65, 4, 6),
    (1, 6, 3, 2, 100, 4, 6),
    (1, 4, 1, 1, 64, 9, 5),
]


def _problem(B, Hq, Hk, Hv, N, D, E, *, dtype, seed, gates, decay, init, resets=True):
    H = max(Hq, Hv)
    g_ = gen(seed)
    q, k, v = randn((B, Hq, N, D), g_, dtype), randn((B, Hk, N, D), g_, dtype), randn((B, Hv, N, E), g_, dtype)
    g = None
    if gates:
        g = -torch.nn.functional.softplus(randn((B, H, N), g_, F64)).to(dtype)
        if resets and N > 4:
            g[:, :, N // 3] = -float("inf")
            g[0, 0, 0] = -float("inf")
    rates = (torch.rand(H, generator=g_) * 0.2).float() if decay else None
    s0 = randn((B, H, D, E), g_, F64 if dtype == F64 else F32) if init else None
    return q, k, v, g, rates, s0


def _run(lasp, q, k, v, g, rates, s0, layout, do, df):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    g_in = g.detach().clone().requires_grad_() if g is not None else None
    s_in = s0.detach().clone().requires_grad_() if s0 is not None else None
    if layout == "bnhd":
        args = [t.transpose(1, 2) for t in ins]
        g_arg = g_in.transpose(1, 2) if g_in is not None else None
    else:
        args, g_arg = ins, g_in
    o, f = lasp.lasp_attention(*args, rates, g=g_arg, initial_state=s_in, output_final_state=True, layout=layout)
    if layout == "bnhd":
        o = o.transpose(1, 2)
    wrt = ins + [t for t in (g_in, s_in) if t is not None]
    gr = torch.autograd.grad([o, f], wrt, [do.to(o.dtype), df])
    names = ["dq", "dk", "dv"] + (["dg"] if g is not None else []) + (["d_initial_state"] if s0 is not None else [])
    return o, f, dict(zip(names, gr))


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape", HEAD_MAPS, ids=lambda s: "x".join(map(str, s)))
def test_head_maps_match_recurrence(lasp, shape, dtype, layout):
    B, Hq, Hk, Hv, N, D, E = shape
    seed = 11 + sum(shape)
    for gates, decay, init in [(True, True, True), (False, True, False), (True, False, False)]:
        q, k, v, g, rates, s0 = _problem(*shape, dtype=dtype, seed=seed, gates=gates, decay=decay, init=init)
        H = max(Hq, Hv)
        gd = gen(seed + 1)
        do, df = randn((B, H, N, E), gd, F64), randn((B, H, D, E), gd, F64 if dtype == F64 else F32)
        o, f, gr = _run(lasp, q, k, v, g, rates, s0, layout, do, df)
        r = ref.gated_recurrent_grads(q, k, v, g, rates, None, s0, do, df)
        what = f"{shape} gates={gates} decay={decay} init={init}"
        assert o.shape == (B, H, N, E), what
        assert_close_to_ref(f"o {what}", o, r["o"], dtype)
        assert_close_to_ref(f"final_state {what}", f, r["final_state"], dtype)
        for name, got in gr.items():
            assert got.shape == r[name].shape, (what, name)
            assert_close_to_ref(f"{name} {what}", got, r[name], dtype)


def test_head_maps_output_layout(lasp):
    """With GVA the output takes v's memory order (v has the output's heads): bnhd in, bnhd-contiguous out."""
    B, Hq, Hk, Hv, N, D, E = 1, 1, 1, 4, 20, 4, 6
    g_ = gen(5)
    q, k, v = (randn((B, N, h, x), g_, F32) for h, x in ((Hq, D), (Hk, D), (Hv, E)))
    o = lasp.lasp_attention(q, k, v, layout="bnhd")
    assert o.shape == (B, N, Hv, E) and o.is_contiguous()


@pytest.mark.parametrize(
    "hq,hk,hv,match",
    [
        (4, 4, 6, "must divide each other"),
        (6, 4, 6, "number of k heads \\(4\\) must divide"),
        (2, 3, 2, "number of k heads \\(3\\) must divide"),
    ],
)
def test_head_map_errors(lasp, hq, hk, hv, match):
    B, N, D, E = 1, 8, 4, 4
    g_ = gen(3)
    q, k, v = randn((B, hq, N, D), g_, F32), randn((B, hk, N, D), g_, F32), randn((B, hv, N, E), g_, F32)
    with pytest.raises((RuntimeError, ValueError), match=match):
        lasp.lasp_attention(q, k, v)


def test_head_map_state_shapes_follow_output_heads(lasp):
    """decay, g and initial_state are per output head (H = max(Hq, Hv)); q's head count is refused for them."""
    B, Hq, Hk, Hv, N, D, E = 1, 1, 1, 4, 8, 4, 4
    g_ = gen(4)
    q, k, v = randn((B, Hq, N, D), g_, F32), randn((B, Hk, N, D), g_, F32), randn((B, Hv, N, E), g_, F32)
    with pytest.raises((RuntimeError, ValueError), match="decay must have one rate per output head \\(H = 4\\)"):
        lasp.lasp_attention(q, k, v, torch.zeros(Hq))
    with pytest.raises((RuntimeError, ValueError), match="g must have shape \\(B, H, N\\) = \\(1, 4, 8\\)"):
        lasp.lasp_attention(q, k, v, g=torch.zeros(B, Hq, N))
    with pytest.raises((RuntimeError, ValueError), match="initial_state must have shape \\(B, H, D, E\\) = \\(1, 4, 4, 4\\)"):
        lasp.lasp_attention(q, k, v, initial_state=torch.zeros(B, Hq, D, E))


# ------------------------------------------------------------------ across ranks (Gloo)
RING_CASES = {
    2: [dict(B=1, Hq=1, Hk=1, Hv=4, D=5, E=6, pieces=[70, 1], dtype=F64, layout="bhnd")],
    3: [dict(B=2, Hq=2, Hk=1, Hv=4, D=4, E=3, pieces=[9, 0, 66], dtype=F32, layout="bnhd")],
    4: [dict(B=1, Hq=6, Hk=2, Hv=3, D=4, E=5, pieces=[5, 1, 64, 3], dtype=F64, layout="bhnd")],
}
STRATEGIES = ("ring", "allgather", "scan")


def _ring_problem(case, seed):
    N = sum(case["pieces"])
    q, k, v, g, rates, s0 = _problem(case["B"], case["Hq"], case["Hk"], case["Hv"], N, case["D"], case["E"],
                                     dtype=case["dtype"], seed=seed, gates=True, decay=True, init=True)
    H = max(case["Hq"], case["Hv"])
    gd = gen(seed + 1)
    do = randn((case["B"], H, N, case["E"]), gd, F64)
    df_last = randn((case["B"], H, case["D"], case["E"]), gd, F64 if case["dtype"] == F64 else F32)
    return q, k, v, g, rates, s0, do, df_last


def _ring_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        from conftest import import_lasp

        lasp = import_lasp()
        out = {}
        for ci, case in enumerate(RING_CASES[world]):
            q, k, v, g, rates, s0, do, df_last = _ring_problem(case, 900 + ci)
            bounds = [0]
            for n in case["pieces"]:
                bounds.append(bounds[-1] + n)
            a, b = bounds[rank], bounds[rank + 1]
            sl = lambda t: t[:, :, a:b]  # noqa: E731  (bhnd pieces; g (B, H, N))
            for strategy in STRATEGIES:
                last = rank == world - 1
                o, f, gr = _run_piece(lasp, sl(q), sl(k), sl(v), sl(g), rates, s0 if rank == 0 else None,
                                      case["layout"], sl(do), df_last if last else None, strategy)
                out[(ci, strategy)] = dict(o=o, f=f, **gr)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_piece(lasp, q, k, v, g, rates, s0, layout, do, df, strategy):
    ins = [t.detach().clone().contiguous().requires_grad_() for t in (q, k, v, g)]
    s_in = s0.detach().clone().requires_grad_() if s0 is not None else None
    qq, kk, vv, gg = ins
    if layout == "bnhd":  # the same tensors seen as (B, N, H, *) / (B, N, H)
        qq, kk, vv, gg = (t.transpose(1, 2) for t in ins)
    o, f = lasp.lasp_attention(qq, kk, vv, rates, g=gg, initial_state=s_in, output_final_state=True,
                               layout=layout, group=dist.group.WORLD, strategy=strategy)
    if layout == "bnhd":
        o = o.transpose(1, 2)
    outs, cots = [o], [do.to(o.dtype)]
    if df is not None:
        outs.append(f)
        cots.append(df)
    wrt = ins + ([s_in] if s_in is not None else [])
    gr = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
    names = ["dq", "dk", "dv", "dg"] + (["d_initial_state"] if s_in is not None else [])
    return o.detach(), f.detach(), dict(zip(names, gr))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
@pytest.mark.parametrize("world", sorted(RING_CASES))
def test_head_maps_ring_gloo(lasp, world):
    results = spawn_world(_ring_worker, world, (), 180, f"the head-map ring on {world} Gloo ranks")
    for ci, case in enumerate(RING_CASES[world]):
        q, k, v, g, rates, s0, do, df_last = _ring_problem(case, 900 + ci)
        r = ref.gated_recurrent_grads(q, k, v, g, rates, None, s0, do, df_last)
        bounds = [0]
        for n in case["pieces"]:
            bounds.append(bounds[-1] + n)
        dt = case["dtype"]
        for strategy in STRATEGIES:
            what = f"W={world} case {ci} {strategy}"
            got = [res[(ci, strategy)] for res in results]
            assert_close_to_ref(f"o {what}", torch.cat([x["o"] for x in got], 2), r["o"], dt)
            assert_close_to_ref(f"final_state {what}", got[-1]["f"], r["final_state"], dt)
            for name, dim in (("dg", 2), ("dq", 2), ("dk", 2), ("dv", 2)):
                assert_close_to_ref(f"{name} {what}", torch.cat([x[name] for x in got], dim), r[name], dt)
            assert_close_to_ref(f"d_initial_state {what}", got[0]["d_initial_state"], r["d_initial_state"], dt)


# ------------------------------------------------------------------ hypothesis over head maps


@st.composite
def _head_map(draw):
    """(Hq, Hk, Hv): H = max(Hq, Hv), every count a divisor of H."""
    H = draw(st.sampled_from([1, 2, 3, 4, 6]))
    divisors = [d for d in range(1, H + 1) if H % d == 0]
    if draw(st.booleans()):
        Hq, Hv = H, draw(st.sampled_from(divisors))
    else:
        Hq, Hv = draw(st.sampled_from(divisors)), H
    return Hq, draw(st.sampled_from(divisors)), Hv


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heads=_head_map(), N=st.integers(0, 140), D=st.integers(1, 9), E=st.integers(1, 9),
       gate_scale=st.sampled_from([0.0, 0.1, 3.0]), layout=st.sampled_from(["bhnd", "bnhd"]),
       init=st.booleans())
def test_head_maps_property(lasp, heads, N, D, E, gate_scale, layout, init):
    Hq, Hk, Hv = heads
    B, H = 1, max(Hq, Hv)
    seed = 1000 + 7 * N + 13 * D + E
    q, k, v, g, rates, s0 = _problem(B, Hq, Hk, Hv, N, D, E, dtype=F64, seed=seed, gates=True, decay=False,
                                     init=init, resets=gate_scale > 1)
    g = g * gate_scale
    gd = gen(seed + 1)
    do, df = randn((B, H, N, E), gd, F64), randn((B, H, D, E), gd, F64)
    o, f, gr = _run(lasp, q, k, v, g, rates, s0, layout, do, df)
    r = ref.gated_recurrent_grads(q, k, v, g, rates, None, s0, do, df)
    what = f"heads={heads} N={N} D={D} E={E} gates x{gate_scale} {layout} init={init}"
    assert_close_to_ref(f"o {what}", o, r["o"], F64)
    assert_close_to_ref(f"final_state {what}", f, r["final_state"], F64)
    for name, got in gr.items():
        assert_close_to_ref(f"{name} {what}", got, r[name], F64)
