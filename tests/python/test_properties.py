"""Hypothesis property tests on the CPU: random shapes, dtypes, decays, layouts and states, the op
against the fp64 reference (values and gradients), and the state-carry (chunked prefill) property.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import acc_dtype, assert_close_to_ref, gen, grads, randn, ref, rel_err

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2, 3]))
    H = Hkv * draw(st.sampled_from([1, 2, 4]))
    N = draw(st.integers(0, 150))
    D = draw(st.integers(1, 40))
    E = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    decay_kind = draw(st.sampled_from(["none", "zero", "uniform", "per_head"]))
    if decay_kind == "none":
        decay = None
    elif decay_kind == "zero":
        decay = torch.zeros(H)
    elif decay_kind == "uniform":
        decay = torch.full((H,), draw(st.floats(0.0, 5.0, allow_nan=False, allow_subnormal=False)))
    else:
        decay = torch.tensor(
            draw(st.lists(st.floats(0.0, 3.0, allow_nan=False, allow_subnormal=False), min_size=H, max_size=H)),
            dtype=torch.float32,
        )
    layout = draw(st.sampled_from(["bhnd", "bnhd"]))
    with_state = draw(st.booleans())
    final_grad = draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.floats(0.05, 3.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, H=H, Hkv=Hkv, N=N, D=D, E=E, dtype=dtype, decay=decay, layout=layout,
                with_state=with_state, final_grad=final_grad, scale=scale, seed=seed)


def _inputs(p):
    g = gen(p["seed"])
    B, H, Hkv, N, D, E, dt = p["B"], p["H"], p["Hkv"], p["N"], p["D"], p["E"], p["dtype"]
    if p["layout"] == "bhnd":
        shapes = [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E)]
    else:
        shapes = [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, E)]
    q, k, v = (randn(s, g, dt).requires_grad_(True) for s in shapes)
    s0 = randn((B, H, D, E), g, acc_dtype(dt)).requires_grad_(True) if p["with_state"] else None
    return g, q, k, v, s0


@SETTINGS
@given(p=problems())
def test_matches_reference(lasp, p):
    g, q, k, v, s0 = _inputs(p)
    dt, layout = p["dtype"], p["layout"]
    o, f = lasp.lasp_attention(q, k, v, p["decay"], scale=p["scale"], initial_state=s0,
                               output_final_state=True, layout=layout)
    rq, rk, rv = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    rs0 = None if s0 is None else s0.detach().double().requires_grad_(True)
    ro, rf = ref.attention_ref(rq, rk, rv, p["decay"], p["scale"], rs0, layout)
    assert o.dtype == dt and f.dtype == acc_dtype(dt)
    assert_close_to_ref("o", o, ro, dt)
    assert_close_to_ref("final_state", f, rf, dt)
    if p["N"] == 0:
        return
    do = randn(o.shape, g, dt)
    dS = randn(f.shape, g, f.dtype) if p["final_grad"] else None
    got = grads([o, f], [q, k, v, s0], [do, dS])
    want = grads([ro, rf], [rq, rk, rv, rs0], [do.double(), None if dS is None else dS.double()])
    for name, a, b in zip(["dq", "dk", "dv", "d_initial_state"], got, want):
        if b is None:
            continue
        assert a is not None, f"{name}: no gradient"
        assert_close_to_ref(name, a, b, dt)


@SETTINGS
@given(p=problems(), frac=st.floats(0.0, 1.0))
def test_state_carry(lasp, p, frac):
    """Splitting the sequence at any point and carrying final_state gives the one-call result."""
    _, q, k, v, s0 = _inputs(p)
    N, layout = p["N"], p["layout"]
    cut = int(round(frac * N))
    dim = 2 if layout == "bhnd" else 1
    kw = dict(scale=p["scale"], output_final_state=True, layout=layout)
    with torch.no_grad():
        o, f = lasp.lasp_attention(q, k, v, p["decay"], initial_state=s0, **kw)
        a = [t.narrow(dim, 0, cut) for t in (q, k, v)]
        b = [t.narrow(dim, cut, N - cut) for t in (q, k, v)]
        o1, f1 = lasp.lasp_attention(*a, p["decay"], initial_state=s0, **kw)
        o2, f2 = lasp.lasp_attention(*b, p["decay"], initial_state=f1, **kw)
    tol = 1e-5 if p["dtype"] == torch.float32 else 1e-12
    assert rel_err(torch.cat([o1, o2], dim=dim), o) < tol
    assert rel_err(f2, f) < tol
