"""Per-token log gates: lasp.lasp_attention(..., g=g).

With ``a[t] = exp(g[b, h, t] - decay[h])`` the op computes ``S[t] = a[t] S[t-1] + k[t]^T v[t]``,
``o[t] = scale q[t] S[t]``; ``g`` is (B, H, N) for layout "bhnd" and (B, N, H) for "bnhd", holds values
<= 0 (``-inf`` resets the state) and takes a gradient.

The float64 truth is reference.gated_recurrent_grads (the recurrence token by token, forward and
backward by hand). For float16/bfloat16 the tolerance rule (conftest) also needs the reference run in
the op's dtype: that is the masked sum ((Q K^T) * M) V with the gate matrix M formed in float64 from g
and rounded once (as reference.attention_ref does with the decay matrix); in float64 it is checked
against gated_recurrent_grads below, so the two formulations check each other.

Covered: values and every gradient (o, final_state, dq, dk, dv, dg, d_initial_state) over chunk
boundaries, odd head dims, MHA/GQA/MQA, decay, states, layouts and dtypes, strong / zero / -inf gates;
g = 0 against g = None and g = -c against decay = c; gradcheck; a hypothesis property; the ring and the
all-gather over Gloo with uneven (1-token, empty) pieces; opcheck and torch.compile; bad gates. The same
cases on CUDA tensors: test_gates_cuda.py.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from conftest import (
    FIXED_REL_TOL,
    acc_dtype,
    assert_close_to_ref,
    gen,
    import_lasp,
    make_decay,
    randn,
    ref,
    rel_err,
    spawn_world,
)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LOWP = (F16, BF16)
NEG_INF = float("-inf")
GRAD_NAMES = ["dq", "dk", "dv", "dg", "d_initial_state"]


# ----------------------------------------------------------------------------------------------
# Inputs


def gate_values(B, H, N, kind, g, resets=()):
    """Log gates (B, H, N) float64, all <= 0.

    kinds: "zero"; "soft" (log sigmoid(x + 3): mostly close to 0, long memory); "strong" (in [-25, -5]:
    almost no memory); "mixed" (-softplus(2 x), with exact zeros, very negative values and -inf
    resets: at position 0 of (batch 0, head 0), at the last position of the last head, and mid-sequence
    for every head of the last batch); "edge" (in [-1.15, -0.85]: a 64-token chunk sums to about -64, on
    either side of the bound where the sm_90 kernels factor a chunk's gate weights, wgmma.cuh GateTile,
    whose factors then span exp(-64) .. exp(64)).
    resets: extra (position, head or None for every head) pairs set to -inf in every batch.
    """
    if kind == "zero":
        out = torch.zeros(B, H, N, dtype=F64)
    elif kind == "soft":
        out = F.logsigmoid(torch.randn(B, H, N, generator=g, dtype=F64) + 3.0)
    elif kind == "strong":
        out = -(5.0 + 20.0 * torch.rand(B, H, N, generator=g, dtype=F64))
    elif kind == "edge":
        out = -(0.85 + 0.3 * torch.rand(B, H, N, generator=g, dtype=F64))
    elif kind == "mixed":
        out = -F.softplus(2.0 * torch.randn(B, H, N, generator=g, dtype=F64))
        out[..., 3::7] = 0.0
        out[..., 5::11] = -40.0
        out[..., 9::23] = -1e3
        if N > 0:
            out[0, 0, 0] = NEG_INF
            out[:, H - 1, N - 1] = NEG_INF
            out[B - 1, :, N // 2] = NEG_INF
    else:
        raise ValueError(kind)
    for pos, head in resets:
        if head is None:
            out[:, :, pos] = NEG_INF
        else:
            out[:, head, pos] = NEG_INF
    return out


def layout_shapes(B, H, Hkv, N, D, E, layout):
    """Shapes of q, k, v and do in the layout ("bhnd": (B, H, N, X); "bnhd": (B, N, H, X))."""
    bhnd_shapes = [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E), (B, H, N, E)]
    return bhnd_shapes if layout == "bhnd" else [(s[0], s[2], s[1], s[3]) for s in bhnd_shapes]


def to_layout_g(g_bhn, layout):
    """(B, H, N) gates in the layout's own shape, contiguous."""
    return g_bhn if layout == "bhnd" else g_bhn.transpose(1, 2).contiguous()


def bhnd(x, layout):
    return x if layout == "bhnd" else x.transpose(1, 2)


def g_bhn(x, layout):
    return x if layout == "bhnd" else x.transpose(1, 2)


def make_case_inputs(c, seed):
    """Leaf q, k, v, g, s0 (or None) in the case's dtype and layout, cotangents do and dS (or None), decay."""
    gg = gen(seed)
    B, H, Hkv, N, D, E, dt, layout = c["B"], c["H"], c["Hkv"], c["N"], c["D"], c["E"], c["dtype"], c["layout"]
    shapes = layout_shapes(B, H, Hkv, N, D, E, layout)
    q, k, v, do = (randn(s, gg, dt) for s in shapes)
    gdt = c.get("gdtype") or dt
    gv = to_layout_g(gate_values(B, H, N, c["gates"], gg, c.get("resets", ())), layout).to(gdt)
    s0 = randn((B, H, D, E), gg, acc_dtype(dt)) if c["state"] else None
    dS = randn((B, H, D, E), gg, acc_dtype(dt)) if c["dS"] else None
    decay = make_decay(c["decay"], H, g=gg)
    for t in (q, k, v, gv) + ((s0,) if s0 is not None else ()):
        t.requires_grad_(True)
    return q, k, v, gv, s0, do, dS, decay


# ----------------------------------------------------------------------------------------------
# References


def reference64(q, k, v, g, decay, scale, s0, do, dS, layout):
    """gated_recurrent_grads on the very same values, results in the op's layout (dg in g's layout shape)."""
    d = lambda t: None if t is None else t.detach().to(F64)  # noqa: E731
    r = ref.gated_recurrent_grads(
        d(bhnd(q, layout)), d(bhnd(k, layout)), d(bhnd(v, layout)),
        None if g is None else d(g_bhn(g, layout)), decay, scale, d(s0), d(bhnd(do, layout)), d(dS),
    )
    return dict(
        o=bhnd(r["o"], layout), final_state=r["final_state"],
        dq=bhnd(r["dq"], layout), dk=bhnd(r["dk"], layout), dv=bhnd(r["dv"], layout),
        dg=g_bhn(r["dg"], layout), d_initial_state=r["d_initial_state"] if s0 is not None else None,
    )


def gate_matrix(lg):
    """Mx (B, H, N+1, N+1) float64 with Mx[.., i, j] = exp(lg[j] + ... + lg[i-1]) for j <= i (the product of
    the gates of tokens j .. i-1), 0 above the diagonal and across a -inf. Index i stands for "after the
    first i tokens": token s adds k[s]^T v[s] at index s + 1, the initial state sits at index 0, o[t] reads
    index t + 1 and the final state is index N. Differentiable in lg (zero gradient at -inf)."""
    B, H, N = lg.shape
    isinf = torch.isneginf(lg.detach())
    fin = torch.where(isinf, torch.zeros_like(lg), lg)
    C = F.pad(fin.cumsum(-1), (1, 0))
    cnt = F.pad(isinf.to(F64).cumsum(-1), (1, 0))
    idx = torch.arange(N + 1)
    valid = (idx[:, None] >= idx[None, :]) & (cnt[..., :, None] == cnt[..., None, :])
    expo = torch.where(valid, C[..., :, None] - C[..., None, :], torch.full((), NEG_INF, dtype=F64))
    return torch.exp(expo)


def gated_quadratic(q, k, v, g, decay, scale, s0, cd):
    """The masked sum in compute dtype cd (bhnd, autograd): o (B, H, N, E) and final_state. The gate
    matrix is formed in float64 from g and rounded once to cd; every other tensor op runs in cd."""
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    lg = torch.zeros(B, H, N, dtype=F64) if g is None else g.to(F64)
    if decay is not None:
        lg = lg - decay.detach().to(F64)[None, :, None]
    Mx = gate_matrix(lg)
    qc = q.to(cd)
    kc = k.to(cd).repeat_interleave(H // Hkv, dim=1)
    vc = v.to(cd).repeat_interleave(H // Hkv, dim=1)
    M = Mx[..., 1:, 1:].to(cd)
    o = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * M, vc) * scale
    w_state = Mx[..., N, 1:].to(cd)  # (B, H, N)
    final = torch.matmul((kc * w_state[..., None]).transpose(-1, -2), vc)
    if s0 is not None:
        s0c = s0.to(cd)
        w_in = Mx[..., 1:, 0].to(cd)  # (B, H, N)
        o = o + scale * torch.matmul(qc * w_in[..., None], s0c)
        final = final + Mx[..., N, 0].to(cd)[..., None, None] * s0c
    return o, final


def reference_in_dtype(q, k, v, g, decay, scale, s0, do, dS, layout, cd):
    """gated_quadratic in cd with autograd: dict like reference64 (gradients in the leaves' dtypes)."""
    lq, lk, lv, lg = (t.detach().clone().requires_grad_(True) for t in (q, k, v, g))
    ls0 = None if s0 is None else s0.detach().clone().requires_grad_(True)
    o, f = gated_quadratic(bhnd(lq, layout), bhnd(lk, layout), bhnd(lv, layout), g_bhn(lg, layout), decay, scale,
                           ls0, cd)
    outs, gos = [o], [bhnd(do, layout).to(cd)]
    if dS is not None:
        outs.append(f)
        gos.append(dS.to(cd))
    ins = [lq, lk, lv, lg] + ([ls0] if ls0 is not None else [])
    gr = torch.autograd.grad(outs, ins, gos, allow_unused=True)
    gr = [torch.zeros_like(t) if a is None else a for a, t in zip(gr, ins)]
    return dict(o=bhnd(o.detach(), layout), final_state=f.detach(), dq=gr[0], dk=gr[1], dv=gr[2], dg=gr[3],
                d_initial_state=gr[4] if ls0 is not None else None)


def run_op(lasp, q, k, v, g, decay, scale, s0, do, dS, layout, strategy="ring"):
    o, f = lasp.lasp_attention(q, k, v, decay, g=g, scale=scale, initial_state=s0, output_final_state=True,
                               layout=layout, strategy=strategy)
    outs, gos = [o], [do]
    if dS is not None:
        outs.append(f)
        gos.append(dS)
    ins = [q, k, v] + ([g] if g is not None else []) + ([s0] if s0 is not None else [])
    gr = list(torch.autograd.grad(outs, ins, gos, allow_unused=True))
    res = dict(o=o.detach(), final_state=f.detach(), dq=gr.pop(0), dk=gr.pop(0), dv=gr.pop(0))
    res["dg"] = gr.pop(0) if g is not None else None
    res["d_initial_state"] = gr.pop(0) if s0 is not None else None
    return res


def check_all(got, want, dtype, lowp=None, where="", gdtype=None):
    """Every quantity of ``want`` against the op's (all of them checked, failures reported together).

    dg comes back in g's dtype: when that is float16/bfloat16 under float32/float64 inputs, dg is held to
    that dtype's rule, its low-precision reference being the float64 one rounded to it."""
    failures = []
    for name in ["o", "final_state"] + GRAD_NAMES:
        if want.get(name) is None or name not in got:
            continue
        rule, lp = dtype, None if lowp is None else lowp[name]
        if name == "dg" and gdtype in LOWP and dtype not in LOWP:
            rule, lp = gdtype, want[name].to(gdtype)
        try:
            assert_close_to_ref(f"{where}{name}", got[name], want[name], rule, lp)
        except AssertionError as e:
            failures.append(str(e).split("\n")[0])
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# 0. The test's own low-precision reference agrees with gated_recurrent_grads in float64


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_quadratic_reference_matches_recurrence(layout, seed):
    c = dict(dtype=F64, B=2, H=4, Hkv=2, N=70, D=5, E=7, decay="alibi", state=True, dS=True, layout=layout,
             gates="mixed")
    q, k, v, g, s0, do, dS, decay = make_case_inputs(c, seed)
    want = reference64(q, k, v, g, decay, 0.6, s0, do, dS, layout)
    got = reference_in_dtype(q, k, v, g, decay, 0.6, s0, do, dS, layout, F64)
    for name in ["o", "final_state"] + GRAD_NAMES:
        e = rel_err(got[name], want[name])
        assert e < 1e-12, f"{name}: masked sum vs recurrence rel err {e:.3e}"


# ----------------------------------------------------------------------------------------------
# 1. The op against gated_recurrent_grads

C = dict  # a case: dtype, B, H, Hkv, N, D, E, decay kind, initial state?, final-state cotangent?, layout, gates
CASES = [
    # float64: tight
    C(dtype=F64, B=2, H=4, Hkv=2, N=65, D=5, E=7, decay="alibi", state=True, dS=True, layout="bhnd", gates="mixed"),
    C(dtype=F64, B=1, H=3, Hkv=1, N=1, D=5, E=7, decay=None, state=True, dS=True, layout="bnhd", gates="mixed"),
    C(dtype=F64, B=1, H=2, Hkv=2, N=63, D=33, E=96, decay="mixed", state=False, dS=True, layout="bhnd", gates="soft"),
    C(dtype=F64, B=2, H=2, Hkv=1, N=64, D=8, E=8, decay=None, state=True, dS=False, layout="bnhd", gates="strong"),
    C(dtype=F64, B=1, H=4, Hkv=4, N=130, D=16, E=16, decay="strong", state=True, dS=True, layout="bhnd",
      gates="mixed", resets=[(64, None), (127, 1), (128, 2)]),
    C(dtype=F64, B=1, H=2, Hkv=1, N=200, D=5, E=7, decay="alibi", state=False, dS=False, layout="bnhd",
      gates="zero"),
    C(dtype=F64, B=1, H=2, Hkv=1, N=0, D=5, E=7, decay="alibi", state=True, dS=True, layout="bhnd", gates="mixed"),
    # float32: 1e-4
    C(dtype=F32, B=1, H=4, Hkv=2, N=200, D=33, E=96, decay="alibi", state=True, dS=True, layout="bhnd",
      gates="mixed"),
    C(dtype=F32, B=2, H=2, Hkv=1, N=65, D=5, E=7, decay=None, state=False, dS=True, layout="bnhd", gates="soft"),
    C(dtype=F32, B=1, H=2, Hkv=2, N=130, D=64, E=64, decay="mixed", state=True, dS=True, layout="bnhd",
      gates="strong", resets=[(0, None), (129, 0)]),
    C(dtype=F32, B=2, H=3, Hkv=3, N=1, D=5, E=7, decay="alibi", state=True, dS=True, layout="bhnd", gates="soft"),
    C(dtype=F32, B=1, H=4, Hkv=1, N=63, D=7, E=5, decay=None, state=True, dS=False, layout="bhnd", gates="mixed",
      gdtype=BF16),
    C(dtype=F32, B=1, H=2, Hkv=1, N=64, D=5, E=7, decay="alibi", state=True, dS=True, layout="bnhd", gates="zero"),
    # bfloat16 / float16: flash-attention's rule
    C(dtype=BF16, B=1, H=4, Hkv=2, N=130, D=32, E=32, decay="alibi", state=True, dS=True, layout="bhnd",
      gates="mixed"),
    C(dtype=BF16, B=2, H=2, Hkv=1, N=65, D=5, E=7, decay=None, state=False, dS=False, layout="bnhd", gates="soft",
      gdtype=F32),
    C(dtype=F16, B=1, H=2, Hkv=2, N=200, D=16, E=24, decay="mixed", state=True, dS=True, layout="bnhd",
      gates="mixed"),
    C(dtype=F16, B=1, H=2, Hkv=1, N=64, D=33, E=96, decay=None, state=True, dS=True, layout="bhnd", gates="strong"),
]


def _case_id(c):
    dt = {F16: "fp16", BF16: "bf16", F32: "fp32", F64: "fp64"}[c["dtype"]]
    gd = "" if c.get("gdtype") is None else "-g" + {F16: "fp16", BF16: "bf16", F32: "fp32", F64: "fp64"}[c["gdtype"]]
    return (f"{dt}{gd}-B{c['B']}H{c['H']}kv{c['Hkv']}-N{c['N']}-D{c['D']}E{c['E']}-{c['decay'] or 'nodecay'}"
            f"-{'s0' if c['state'] else 'nos0'}-{'dS' if c['dS'] else 'nodS'}-{c['layout']}-{c['gates']}")


@pytest.mark.parametrize("c", [pytest.param(c, id=_case_id(c)) for c in CASES])
def test_matches_gated_reference(lasp, c, seed):
    dt, layout = c["dtype"], c["layout"]
    q, k, v, g, s0, do, dS, decay = make_case_inputs(c, seed)
    before = [t.detach().clone() for t in (q, k, v, g)]
    scale = None if c["N"] % 2 else 0.4
    got = run_op(lasp, q, k, v, g, decay, scale, s0, do, dS, layout)
    for t, b in zip((q, k, v, g), before):
        assert torch.equal(t.detach(), b), "the op modified an input"
    B, H, N, E = c["B"], c["H"], c["N"], c["E"]
    assert got["o"].dtype == dt and got["final_state"].dtype == acc_dtype(dt)
    assert tuple(got["o"].shape) == ((B, H, N, E) if layout == "bhnd" else (B, N, H, E))
    assert got["dg"] is not None, "g requires grad but got no gradient"
    assert got["dg"].dtype == g.dtype and got["dg"].shape == g.shape, (got["dg"].dtype, tuple(got["dg"].shape))
    want = reference64(q, k, v, g, decay, scale, s0, do, dS, layout)
    lowp = reference_in_dtype(q, k, v, g, decay, scale, s0, do, dS, layout, dt) if dt in LOWP else None
    check_all(got, want, dt, lowp, gdtype=g.dtype)
    for name in ["o", "final_state"] + GRAD_NAMES:
        if got.get(name) is not None:
            assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"


# ----------------------------------------------------------------------------------------------
# 2. g = 0 is g = None; g = -c is decay = c


SAME = [
    C(dtype=F64, B=2, H=4, Hkv=2, N=130, D=5, E=7, decay="alibi", state=True, dS=True, layout="bhnd", gates="zero"),
    C(dtype=F32, B=1, H=2, Hkv=1, N=200, D=33, E=16, decay=None, state=True, dS=True, layout="bnhd", gates="zero"),
    C(dtype=F32, B=2, H=3, Hkv=3, N=65, D=8, E=8, decay="mixed", state=False, dS=True, layout="bhnd", gates="zero"),
    C(dtype=BF16, B=1, H=2, Hkv=2, N=70, D=16, E=16, decay="alibi", state=True, dS=True, layout="bnhd",
      gates="zero"),
]


@pytest.mark.parametrize("c", [pytest.param(c, id=_case_id(c)) for c in SAME])
def test_zero_gates_equal_no_gates(lasp, c, seed):
    dt, layout = c["dtype"], c["layout"]
    q, k, v, g, s0, do, dS, decay = make_case_inputs(c, seed)
    with_g = run_op(lasp, q, k, v, g, decay, None, s0, do, dS, layout)
    without = run_op(lasp, q, k, v, None, decay, None, s0, do, dS, layout)
    for name in ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]:
        if without[name] is None:
            continue
        if dt in LOWP:
            # both in the dtype: compare each to the float64 reference by the dtype's rule instead
            continue
        e = rel_err(with_g[name], without[name])
        assert e <= FIXED_REL_TOL[dt], f"{name}: g = 0 vs g = None rel err {e:.3e}"
    want = reference64(q, k, v, g, decay, None, s0, do, dS, layout)
    lowp = reference_in_dtype(q, k, v, g, decay, None, s0, do, dS, layout, dt) if dt in LOWP else None
    check_all(with_g, want, dt, lowp, "g = 0: ")
    without.pop("dg")
    check_all(without, want, dt, lowp, "g = None: ")


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("extra_decay", [False, True])
def test_constant_gates_equal_decay(lasp, dtype, layout, extra_decay, seed):
    """g[b, h, t] = -c[h] gives the op with decay = c (and with a decay d as well: decay = c + d)."""
    B, H, Hkv, N, D, E = 2, 4, 2, 150, 6, 10
    gg = gen(seed)
    c = make_decay("mixed", H, g=gg)  # head 0 exactly 0
    d = make_decay("alibi", H) if extra_decay else None
    shapes = layout_shapes(B, H, Hkv, N, D, E, layout)
    q, k, v, do = (randn(s, gg, dtype) for s in shapes)
    s0 = randn((B, H, D, E), gg, acc_dtype(dtype))
    dS = randn((B, H, D, E), gg, acc_dtype(dtype))
    for t in (q, k, v, s0):
        t.requires_grad_(True)
    g = to_layout_g((-c.to(F64))[None, :, None].expand(B, H, N), layout).to(dtype).requires_grad_(True)
    gated = run_op(lasp, q, k, v, g, d, None, s0, do, dS, layout)
    decayed = run_op(lasp, q, k, v, None, c if d is None else c + d, None, s0, do, dS, layout)
    tol = FIXED_REL_TOL[dtype]
    for name in ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]:
        e = rel_err(gated[name], decayed[name])
        assert e <= tol, f"{name}: g = -c vs decay = c rel err {e:.3e} > {tol:.0e}"
    want = reference64(q, k, v, g, d, None, s0, do, dS, layout)
    check_all(gated, want, dtype)


def test_noncontiguous_gates(lasp, seed):
    """g read through its strides: a transposed view gives the result of its contiguous copy."""
    B, H, N, D, E = 2, 3, 70, 5, 7
    gg = gen(seed)
    q, k, v = (randn(s, gg, F64).requires_grad_(True) for s in [(B, H, N, D), (B, H, N, D), (B, H, N, E)])
    base = gate_values(B, H, N, "mixed", gg).transpose(1, 2).contiguous()  # (B, N, H)
    g_view = base.transpose(1, 2).requires_grad_(False)  # (B, H, N), not contiguous
    assert not g_view.is_contiguous()
    g_nc = g_view.detach().requires_grad_(True)
    g_c = g_view.detach().contiguous().requires_grad_(True)
    do = randn((B, H, N, E), gg, F64)
    a = run_op(lasp, q, k, v, g_nc, None, None, None, do, None, "bhnd")
    b = run_op(lasp, q, k, v, g_c, None, None, None, do, None, "bhnd")
    for name in ["o", "final_state", "dq", "dk", "dv", "dg"]:
        assert rel_err(a[name], b[name]) <= 1e-12, name
    assert a["dg"].shape == g_nc.shape


# ----------------------------------------------------------------------------------------------
# 3. gradcheck


GRADCHECK = [
    # B, H, Hkv, N, D, E, decay, layout
    pytest.param(1, 2, 1, 7, 3, 4, None, "bhnd", id="mqa-N7"),
    pytest.param(2, 2, 2, 5, 2, 3, "alibi", "bnhd", id="mha-decay-bnhd"),
    pytest.param(1, 1, 1, 67, 2, 2, "mixed", "bhnd", id="two-chunks"),
]


@pytest.mark.parametrize("B,H,Hkv,N,D,E,decay_kind,layout", GRADCHECK)
def test_gradcheck(lasp, B, H, Hkv, N, D, E, decay_kind, layout, seed):
    gg = gen(seed)
    shapes = layout_shapes(B, H, Hkv, N, D, E, layout)[:3]
    q, k, v = (randn(s, gg, F64).requires_grad_(True) for s in shapes)
    gv = -0.1 - 1.9 * torch.rand(B, H, N, generator=gg, dtype=F64)  # in [-2, -0.1]: away from 0, finite
    g = to_layout_g(gv, layout).requires_grad_(True)
    s0 = randn((B, H, D, E), gg, F64).requires_grad_(True)
    decay = make_decay(decay_kind, H, g=gg)

    def f(q, k, v, g, s0):
        return lasp.lasp_attention(q, k, v, decay, g=g, scale=0.8, initial_state=s0, output_final_state=True,
                                   layout=layout)

    assert torch.autograd.gradcheck(f, (q, k, v, g, s0))


# ----------------------------------------------------------------------------------------------
# 4. hypothesis


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2, 3]))
    H = Hkv * draw(st.sampled_from([1, 2, 4]))
    N = draw(st.integers(0, 140))
    D = draw(st.integers(1, 40))
    E = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([F32, F64]))
    gate_scale = draw(st.floats(0.0, 8.0, allow_nan=False, allow_subnormal=False))
    resets = draw(st.lists(st.integers(0, max(N - 1, 0)), max_size=3)) if N > 0 else []
    decay = draw(st.sampled_from([None, "alibi", "mixed"]))
    layout = draw(st.sampled_from(["bhnd", "bnhd"]))
    with_state = draw(st.booleans())
    final_grad = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, H=H, Hkv=Hkv, N=N, D=D, E=E, dtype=dtype, gate_scale=gate_scale, resets=resets, decay=decay,
                layout=layout, with_state=with_state, final_grad=final_grad, seed=seed)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_property_matches_reference(lasp, p):
    gg = gen(p["seed"])
    B, H, Hkv, N, D, E, dt, layout = p["B"], p["H"], p["Hkv"], p["N"], p["D"], p["E"], p["dtype"], p["layout"]
    shapes = layout_shapes(B, H, Hkv, N, D, E, layout)
    q, k, v, do = (randn(s, gg, dt) for s in shapes)
    gv = -p["gate_scale"] * F.softplus(torch.randn(B, H, N, generator=gg, dtype=F64))
    for t in p["resets"]:
        gv[:, (t * 7) % H, t] = NEG_INF
    g = to_layout_g(gv, layout).to(dt)
    s0 = randn((B, H, D, E), gg, acc_dtype(dt)) if p["with_state"] else None
    dS = randn((B, H, D, E), gg, acc_dtype(dt)) if p["final_grad"] else None
    decay = make_decay(p["decay"], H, g=gg)
    for t in (q, k, v, g) + ((s0,) if s0 is not None else ()):
        t.requires_grad_(True)
    got = run_op(lasp, q, k, v, g, decay, None, s0, do, dS, layout)
    want = reference64(q, k, v, g, decay, None, s0, do, dS, layout)
    check_all(got, want, dt)


# ----------------------------------------------------------------------------------------------
# 5. The ring (and the all-gather) over Gloo

STRATEGIES = ("ring", "allgather", "scan")
# On NCCL also the ring over each transport named (lasp.set_ring_transport): "auto" keeps gated calls on
# the process group, "peer" asks for the peer hop with its per-(b, h) factors
NCCL_STRATEGIES = STRATEGIES + ("ring/nccl", "ring/peer")
SPAWN_DEADLINE_S = 180
PG_TIMEOUT_S = 90

# As in test_distributed: pieces (one length per group rank); state None / "rank0" / "all"; final_grads
# "none" / "last" / "all"; groups None (WORLD) or rank lists. resets: (global position, head or None).
DIST_CASES = {
    2: [
        dict(dtype=F32, B=2, H=4, Hkv=2, D=8, E=12, pieces=[7, 9], decay="alibi", state="rank0", final_grads="last",
             layout="bhnd", gates="mixed", resets=[(7, None), (15, 1)]),
        dict(dtype=F64, B=1, H=2, Hkv=1, D=4, E=6, pieces=[1, 12], decay=None, state="all", final_grads="all",
             layout="bnhd", gates="soft", resets=[(5, 0)]),
        dict(dtype=F32, B=1, H=2, Hkv=2, D=8, E=8, pieces=[65, 64], decay="mixed", state="rank0",
             final_grads="all", layout="bhnd", gates="mixed", resets=[]),
    ],
    3: [
        dict(dtype=F64, B=1, H=4, Hkv=2, D=5, E=7, pieces=[1, 9, 3], decay="alibi", state="rank0",
             final_grads="all", layout="bnhd", gates="soft", resets=[(0, None), (10, 2)]),
        dict(dtype=F32, B=2, H=2, Hkv=1, D=6, E=6, pieces=[20, 0, 30], decay=None, state="rank0",
             final_grads="all", layout="bhnd", gates="mixed", resets=[(20, 0)]),
        dict(dtype=F64, B=1, H=2, Hkv=1, D=9, E=5, pieces=[70, 1, 129], decay="strong", state="all",
             final_grads="last", layout="bhnd", gates="strong", resets=[(70, None)]),
    ],
    4: [
        dict(dtype=F32, B=2, H=4, Hkv=2, D=8, E=12, pieces=[5, 1, 9, 3], decay="alibi", state="rank0",
             final_grads="all", layout="bhnd", gates="soft", resets=[(5, None), (17, 3)]),
        dict(dtype=F64, B=1, H=2, Hkv=2, D=4, E=3, pieces=[4, 0, 4, 1], decay=None, state="all",
             final_grads="last", layout="bnhd", gates="mixed", resets=[(8, 1)]),
        dict(dtype=F64, B=2, H=2, Hkv=1, D=4, E=5, pieces=[6, 2], decay="mixed", state="rank0", final_grads="all",
             layout="bhnd", gates="soft", resets=[(6, 0)], groups=[[0, 1], [2, 3]]),
    ],
}


def _dist_seed(world, ci, gi):
    return 777 + 1000 * world + 37 * ci + 7 * gi


def _seq_dim(layout):
    """The token dim of q, k, v, o in the layout; also g's ((B, H, N) or (B, N, H))."""
    return 2 if layout == "bhnd" else 1


def _offsets(pieces):
    out, p = [], 0
    for n in pieces:
        out.append(p)
        p += n
    return out


def make_dist_problem(case, seed):
    """Full-sequence inputs (CPU), identical in every process."""
    gg = gen(seed)
    B, H, Hkv, D, E = case["B"], case["H"], case["Hkv"], case["D"], case["E"]
    N = sum(case["pieces"])
    dt, layout = case["dtype"], case["layout"]
    shapes = layout_shapes(B, H, Hkv, N, D, E, layout)
    q, k, v, do = (randn(s, gg, dt) for s in shapes)
    g = to_layout_g(gate_values(B, H, N, case["gates"], gg, case["resets"]), layout).to(dt)
    s0 = randn((B, H, D, E), gg, acc_dtype(dt)) if case["state"] else None
    decay = make_decay(case["decay"], H, g=gg)
    W = len(case["pieces"])
    dS = [randn((B, H, D, E), gg, acc_dtype(dt)) for _ in range(W)]
    if case["final_grads"] == "none":
        dS = [None] * W
    elif case["final_grads"] == "last":
        dS = [None] * (W - 1) + [dS[-1]]
    return dict(q=q, k=k, v=v, g=g, do=do, s0=s0, decay=decay, dS=dS)


def _dist_case(world, ci, backend):
    """The case as run on `backend`: the CUDA kernels have no float64, so nccl runs those in float32."""
    case = dict(DIST_CASES[world][ci])
    if backend == "nccl" and case["dtype"] == F64:
        case["dtype"] = F32
    return case


def _dist_worker(rank, world, port, backend, out_dir):
    torch.set_num_threads(1)  # several processes share the machine's cores
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    lasp = import_lasp()
    results = {}
    for ci in range(len(DIST_CASES[world])):
        case = _dist_case(world, ci, backend)
        if case.get("groups") is None:
            pgs = [(list(range(world)), dist.group.WORLD)]
        else:
            pgs = [(ranks, dist.new_group(ranks)) for ranks in case["groups"]]  # every rank calls new_group
        for gi, (ranks, pg) in enumerate(pgs):
            if rank not in ranks:
                continue
            r = ranks.index(rank)
            prob = make_dist_problem(case, _dist_seed(world, ci, gi))
            P, n, layout = _offsets(case["pieces"])[r], case["pieces"][r], case["layout"]
            q, k, v, do = (prob[x].narrow(_seq_dim(layout), P, n).clone().to(device) for x in ("q", "k", "v", "do"))
            g = prob["g"].narrow(_seq_dim(layout), P, n).clone().to(device)
            for t in (q, k, v, g):
                t.requires_grad_(True)
            s0 = None
            if prob["s0"] is not None and (r == 0 or case["state"] == "all"):
                s0 = prob["s0"].clone().to(device).requires_grad_(True)
            decay = None if prob["decay"] is None else prob["decay"].to(device)
            for strategy in NCCL_STRATEGIES if backend == "nccl" else STRATEGIES:
                lasp.set_ring_transport(strategy.split("/")[1] if "/" in strategy else "auto")
                try:
                    o, f = lasp.lasp_attention(q, k, v, decay, g=g, group=pg, initial_state=s0,
                                               output_final_state=True, layout=layout,
                                               strategy=strategy.split("/")[0])
                    dS = prob["dS"][r]
                    outs, gos = [o], [do]
                    if dS is not None:
                        outs.append(f)
                        gos.append(dS.to(device))
                    ins = [q, k, v, g] + ([s0] if s0 is not None else [])
                    gr = torch.autograd.grad(outs, ins, gos, allow_unused=True)
                finally:
                    lasp.set_ring_transport("auto")
                cpu = lambda t: t if t is None else t.detach().cpu()  # noqa: E731
                results[(ci, gi, r, strategy)] = dict(
                    o=cpu(o), f=cpu(f), dq=cpu(gr[0]), dk=cpu(gr[1]), dv=cpu(gr[2]), dg=cpu(gr[3]),
                    ds0=cpu(gr[4]) if s0 is not None else "not passed",
                )
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


_DIST_CACHE = {}


def run_dist_world(world, backend="gloo"):
    key = (world, backend)
    if key in _DIST_CACHE:
        if isinstance(_DIST_CACHE[key], BaseException):
            raise RuntimeError(f"the {backend} world={world} spawn failed earlier") from _DIST_CACHE[key]
        return _DIST_CACHE[key]
    try:
        merged = {}
        for res in spawn_world(_dist_worker, world, (backend,), SPAWN_DEADLINE_S,
                               f"gated ring ({backend}, world={world})"):
            merged.update(res)
    except BaseException as e:
        _DIST_CACHE[key] = e
        raise
    _DIST_CACHE[key] = merged
    return merged


def dist_expected(case, seed):
    """fp64 reference for the loss the ranks back-propagate, sum_r <o_r, do_r> + sum_r <final_r, dS_r>
    (final_r: the state after piece r): gated_recurrent_grads on the whole sequence for the first sum, and on
    each prefix ending with piece r (zero cotangent on o, dS_r on its final state) for the second."""
    prob = make_dist_problem(case, seed)
    layout, pieces = case["layout"], case["pieces"]
    ends = [P + n for P, n in zip(_offsets(pieces), pieces)]
    N = ends[-1]
    sd = gd = _seq_dim(layout)
    q, k, v, g, do, s0 = (prob[x] for x in ("q", "k", "v", "g", "do", "s0"))
    full = reference64(q, k, v, g, prob["decay"], None, s0, do, None, layout)
    tot = {name: full[name].clone() for name in ("dq", "dk", "dv", "dg")}
    tot["d_initial_state"] = None if s0 is None else full["d_initial_state"].clone()
    finals = []
    for e, dS in zip(ends, prob["dS"]):
        pre = [t.narrow(sd, 0, e) for t in (q, k, v)]
        pg = g.narrow(gd, 0, e)
        zero_do = torch.zeros_like(do.narrow(sd, 0, e))
        r = reference64(*pre, pg, prob["decay"], None, s0, zero_do, dS, layout)
        finals.append(r["final_state"])
        if dS is None:
            continue
        for name in ("dq", "dk", "dv"):
            tot[name].narrow(sd, 0, e).add_(r[name])
        tot["dg"].narrow(gd, 0, e).add_(r["dg"])
        if s0 is not None:
            tot["d_initial_state"].add_(r["d_initial_state"])
    assert tot["dq"].shape[sd] == N
    return dict(o=full["o"], finals=finals, **tot)


_DIST_EXPECTED = {}


def _dist_params():
    return [pytest.param(w, ci, id=f"w{w}-c{ci}") for w in sorted(DIST_CASES) for ci in range(len(DIST_CASES[w]))]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world,ci", _dist_params())
def test_ring_gloo_gates(lasp, world, ci, strategy):
    _check_dist_case(run_dist_world(world), world, ci, strategy, "gloo")


_NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("strategy", NCCL_STRATEGIES)
@pytest.mark.parametrize("world,ci", _dist_params())
def test_ring_nccl_gates(lasp, world, ci, strategy):
    """The gated ring on GPUs: over NCCL, and over peer memory ("ring/peer": each hop scales by the piece's
    per-(b, h) factors in the hop kernel), against the float64 reference."""
    if _NGPU < world:
        pytest.skip(f"needs {world} CUDA devices for nccl, found {_NGPU}")
    if not dist.is_nccl_available():
        pytest.skip("nccl not available")
    _check_dist_case(run_dist_world(world, "nccl"), world, ci, strategy, "nccl")


def _check_dist_case(results, world, ci, strategy, backend):
    case = _dist_case(world, ci, backend)
    dt, layout = case["dtype"], case["layout"]
    sd = gd = _seq_dim(layout)
    groups = case.get("groups") or [list(range(world))]
    for gi, ranks in enumerate(groups):
        key = (world, ci, gi, dt)
        if key not in _DIST_EXPECTED:
            _DIST_EXPECTED[key] = dist_expected(case, _dist_seed(world, ci, gi))
        exp = _DIST_EXPECTED[key]
        for r, (P, n) in enumerate(zip(_offsets(case["pieces"]), case["pieces"])):
            got = results[(ci, gi, r, strategy)]
            where = f"{strategy}: case {ci} group {ranks} group-rank {r} (global {ranks[r]}), piece [{P}, {P + n}): "
            assert got["o"].dtype == dt and got["f"].dtype == acc_dtype(dt), where
            assert got["dg"] is not None and got["dg"].dtype == dt, where + "dg missing or of the wrong dtype"
            pairs = [
                ("o", got["o"], exp["o"].narrow(sd, P, n)),
                ("final_state", got["f"], exp["finals"][r]),
                ("dq", got["dq"], exp["dq"].narrow(sd, P, n)),
                ("dk", got["dk"], exp["dk"].narrow(sd, P, n)),
                ("dv", got["dv"], exp["dv"].narrow(sd, P, n)),
                ("dg", got["dg"], exp["dg"].narrow(gd, P, n)),
            ]
            if case["state"] is not None and r == 0:
                pairs.append(("d_initial_state", got["ds0"], exp["d_initial_state"]))
            for name, a, want in pairs:
                assert a is not None, f"{where}{name} is None"
                assert_close_to_ref(f"{where}{name} vs fp64 reference", a, want, dt)
            if case["state"] == "all" and r > 0:
                ds0 = got["ds0"]
                assert ds0 is None or torch.count_nonzero(ds0) == 0, (
                    f"{where}initial_state passed on a rank > 0 must get a zero gradient")


# ----------------------------------------------------------------------------------------------
# 6. The dispatcher ops: opcheck, what fwd / bwd compute, torch.compile


def _op_inputs(B, H, Hkv, N, D, E, dtype, seed, requires_grad, with_state=True):
    gg = gen(seed)
    q, k, v = (randn(s, gg, dtype) for s in [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E)])
    g = gate_values(B, H, N, "mixed", gg).to(dtype)
    s0 = randn((B, H, D, E), gg, acc_dtype(dtype)) if with_state else None
    for t in (q, k, v, g) + ((s0,) if s0 is not None else ()):
        t.requires_grad_(requires_grad)
    return q, k, v, g, s0


OPCHECK = [
    # H, Hkv, N, decay, state, requires_grad, dtype
    pytest.param(4, 2, 9, "alibi", True, True, F32, id="gqa-decay-state-grad"),
    pytest.param(2, 2, 70, None, False, True, F32, id="plain-grad-two-chunks"),
    pytest.param(2, 1, 5, "mixed", True, False, F32, id="mqa-state-nograd"),
    pytest.param(2, 2, 6, "alibi", True, True, F64, id="fp64-state-grad"),
    pytest.param(2, 2, 66, "alibi", False, True, BF16, id="bf16-grad"),
]


@pytest.mark.parametrize("H,Hkv,N,decay_kind,with_state,requires_grad,dtype", OPCHECK)
def test_opcheck_lasp_attention_with_gates(lasp, H, Hkv, N, decay_kind, with_state, requires_grad, dtype, seed):
    B, D, E = 2, 4, 6
    q, k, v, g, s0 = _op_inputs(B, H, Hkv, N, D, E, dtype, seed, requires_grad, with_state)
    decay = make_decay(decay_kind, H, g=gen(seed))
    opcheck(torch.ops.lasp.lasp_attention, (q, k, v, decay, 0.7, s0, None, "ring", g))


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck_fwd_bwd_with_gates(lasp, dtype, with_state, seed):
    B, H, Hkv, N, D, E = 2, 4, 2, 70, 4, 6
    q, k, v, g, s0 = _op_inputs(B, H, Hkv, N, D, E, dtype, seed, False, with_state)
    decay = make_decay("alibi", H)
    fwd_args = (q, k, v, decay, 0.7, s0, None, "ring", 0, 0, g)
    opcheck(torch.ops.lasp.lasp_attention_fwd, fwd_args)
    o, f, state_in, seg = torch.ops.lasp.lasp_attention_fwd(*fwd_args)
    gg = gen(seed + 1)
    do, dS = randn(o.shape, gg, dtype), randn(f.shape, gg, f.dtype)
    bwd_args = (q, k, v, do, dS, decay, 0.7, state_in.clone(), None, "ring", None, 0, g)
    opcheck(torch.ops.lasp.lasp_attention_bwd, bwd_args)
    opcheck(torch.ops.lasp.lasp_attention_bwd, (q, k, v, do, None, None, 0.7, state_in.clone(), None, "ring", None,
                                                0, g))
    dq, dk, dv, ds0, dg = torch.ops.lasp.lasp_attention_bwd(*bwd_args)
    acc = acc_dtype(dtype)
    assert dg.dtype == acc and dg.shape == (B, H, N) and dg.is_contiguous(), (dg.dtype, tuple(dg.shape))
    # without gates: a 0-element dg
    o0, f0, s_in0, _ = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, s0, None)
    dg0 = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, 0.7, s_in0, None)[4]
    assert dg0.numel() == 0 and dg0.dtype == acc


@pytest.mark.parametrize("dtype", [F32, F64])
def test_fwd_bwd_ops_match_reference(lasp, dtype, seed):
    """lasp_attention_fwd / lasp_attention_bwd with g compute the gated recurrence and its gradients."""
    B, H, Hkv, N, D, E = 2, 4, 2, 131, 5, 7
    q, k, v, g, s0 = _op_inputs(B, H, Hkv, N, D, E, dtype, seed, False)
    decay = make_decay("alibi", H)
    o, f, state_in, seg = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, s0, None, "ring", 0, 0, g)
    gg = gen(seed + 1)
    do, dS = randn(o.shape, gg, dtype), randn(f.shape, gg, f.dtype)
    dq, dk, dv, ds0, dg = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, 0.7, state_in, None, "ring",
                                                            None, 0, g)
    want = reference64(q, k, v, g, decay, 0.7, s0, do, dS, "bhnd")
    got = dict(o=o, final_state=f, dq=dq, dk=dk, dv=dv, dg=dg, d_initial_state=ds0)
    check_all(got, want, dtype)


def test_meta_kernels_with_gates(lasp):
    B, H, Hkv, N, D, E = 2, 4, 2, 37, 8, 12
    for dtype, acc in [(BF16, F32), (F64, F64)]:
        q = torch.empty(B, H, N, D, dtype=dtype, device="meta")
        k = torch.empty(B, Hkv, N, D, dtype=dtype, device="meta")
        v = torch.empty(B, Hkv, N, E, dtype=dtype, device="meta")
        g = torch.empty(B, H, N, dtype=dtype, device="meta")
        o, f, s_in, _ = torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", 0, 0, g)
        assert o.shape == (B, H, N, E) and f.shape == (B, H, D, E) and f.dtype == acc
        do = torch.empty(B, H, N, E, dtype=dtype, device="meta")
        dq, dk, dv, ds, dg = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, None, None, 0.5, s_in, None, "ring",
                                                               None, 0, g)
        assert dg.shape == (B, H, N) and dg.dtype == acc and dg.device.type == "meta"
        o2 = lasp.lasp_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g=g.transpose(1, 2),
                                 layout="bnhd")
        assert o2.shape == (B, N, H, E)


def _compiled_vs_eager(lasp, layout, dynamic, seed, dtype=F32):
    torch._dynamo.reset()
    B, H, Hkv, D, E = 2, 4, 2, 8, 12

    def f(q, k, v, g, decay, s0):
        o, fs = lasp.lasp_attention(q, k, v, decay, g=g, initial_state=s0, output_final_state=True, layout=layout)
        return torch.tanh(o).float().sum() + (fs * fs).sum(), o, fs

    cf = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for N in ([37, 70] if dynamic else [70]):
        c = dict(dtype=dtype, B=B, H=H, Hkv=Hkv, N=N, D=D, E=E, decay="alibi", state=True, dS=False, layout=layout,
                 gates="mixed")
        q, k, v, g, s0, _, _, decay = make_case_inputs(c, seed + N)
        ins = [q, k, v, g, s0]
        loss, o, fs = f(q, k, v, g, decay, s0)
        ge = torch.autograd.grad(loss, ins)
        closs, co, cfs = cf(q, k, v, g, decay, s0)
        gc = torch.autograd.grad(closs, ins)
        tol = 1e-6 if dtype == F32 else 1e-12
        assert co.shape == o.shape and co.dtype == o.dtype
        assert rel_err(co, o) < tol and rel_err(cfs, fs) < tol
        for name, a, b in zip(["dq", "dk", "dv", "dg", "d_initial_state"], gc, ge):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert rel_err(a, b) < tol, name
        # eager itself is right (agreement is not agreement on garbage)
        want = reference64(q, k, v, g, decay, None, s0, torch.zeros_like(o), None, layout)
        assert_close_to_ref("o", o, want["o"], dtype)
        assert_close_to_ref("final_state", fs, want["final_state"], dtype)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_compile_fullgraph_with_gates(lasp, layout, seed):
    _compiled_vs_eager(lasp, layout, False, seed)


def test_compile_fullgraph_with_gates_dynamic(lasp, seed):
    _compiled_vs_eager(lasp, "bhnd", True, seed)


# ----------------------------------------------------------------------------------------------
# 7. Bad gates


def _small(layout="bhnd", dtype=F32):
    B, H, N, D, E = 2, 3, 5, 4, 6
    gg = gen(1)
    if layout == "bhnd":
        q, k, v = (randn(s, gg, dtype) for s in [(B, H, N, D), (B, H, N, D), (B, H, N, E)])
    else:
        q, k, v = (randn(s, gg, dtype) for s in [(B, N, H, D), (B, N, H, D), (B, N, H, E)])
    return q, k, v, (B, H, N)


G_WORD = r"(^|\W)g(\W|$)"  # the message names g


@pytest.mark.parametrize("what", ["positive", "plus-inf", "nan", "positive-tiny"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_bad_gate_values(lasp, what, layout):
    q, k, v, (B, H, N) = _small(layout)
    g = -torch.rand(B, H, N)
    g[1, 2, 4] = {"positive": 0.5, "plus-inf": float("inf"), "nan": float("nan"), "positive-tiny": 1e-30}[what]
    g = to_layout_g(g, layout)
    with pytest.raises(ValueError, match=G_WORD):
        lasp.lasp_attention(q, k, v, g=g, layout=layout)
    with pytest.raises(ValueError, match=G_WORD), torch.no_grad():
        lasp.lasp_attention(q, k, v, g=g, layout=layout)
    g.requires_grad_(True)
    with pytest.raises(ValueError, match=G_WORD):
        lasp.lasp_attention(q, k, v, g=g, layout=layout)


def test_value_checks_switch(lasp):
    """set_value_checks(False) reads no values: a positive g or a negative decay then runs (both ops); True
    (the default) raises again; get_value_checks tells the setting; a non-bool is refused."""
    q, k, v, (B, H, N) = _small()
    g = -torch.rand(B, H, N)
    g[0, 1, 2] = 0.25
    beta = torch.rand(B, H, N)
    decay = torch.tensor([0.1, -0.2, 0.3, 0.0])[:H] if H <= 4 else None
    assert lasp.get_value_checks() is True
    try:
        lasp.set_value_checks(False)
        assert lasp.get_value_checks() is False
        assert torch.isfinite(lasp.lasp_attention(q, k, v, g=g)).all()
        assert torch.isfinite(lasp.gated_delta_attention(q, k, v, g, beta, use_qk_l2norm=True)).all()
        if decay is not None:
            lasp.lasp_attention(q, k, v, decay.abs().neg())
    finally:
        lasp.set_value_checks(True)
    assert lasp.get_value_checks() is True
    with pytest.raises(ValueError, match=G_WORD):
        lasp.lasp_attention(q, k, v, g=g)
    with pytest.raises(ValueError, match="g must be <= 0"):
        lasp.gated_delta_attention(q, k, v, g, beta)
    if decay is not None:
        with pytest.raises(ValueError, match="decay must hold rates >= 0"):
            lasp.lasp_attention(q, k, v, decay)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        lasp.set_value_checks(1)


def test_allowed_gate_values(lasp):
    """0, -0.0, -inf and huge negative values are fine; g and q may differ in float dtype."""
    q, k, v, (B, H, N) = _small()
    g = torch.tensor([0.0, -0.0, NEG_INF, -1e30, -1e-30]).repeat(B, H, 1)
    o = lasp.lasp_attention(q, k, v, g=g)
    assert torch.isfinite(o).all()
    for gdt in (F16, BF16, F64):
        o2 = lasp.lasp_attention(q, k, v, g=g.to(gdt))
        assert torch.isfinite(o2).all()


BAD_SHAPES = {  # (B, H, N) = (2, 3, 5) for layout bhnd
    "bnh-for-bhnd": (2, 5, 3), "2-D": (2, 3), "4-D": (2, 3, 5, 1), "1-D": (30,),
    "batch": (3, 3, 5), "tokens": (2, 3, 6), "heads": (2, 4, 5),
}


@pytest.mark.parametrize("shape", list(BAD_SHAPES.values()), ids=list(BAD_SHAPES))
def test_bad_gate_shape(lasp, shape):
    q, k, v, (B, H, N) = _small()
    assert H != N
    with pytest.raises((ValueError, TypeError), match=G_WORD):
        lasp.lasp_attention(q, k, v, g=torch.zeros(shape))


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 5), (2, 4, 3)], ids=["bhn-for-bnhd", "2-D", "heads"])
def test_bad_gate_shape_bnhd(lasp, shape):
    """layout bnhd takes (B, N, H) = (2, 5, 3)."""
    q, k, v, _ = _small("bnhd")
    with pytest.raises((ValueError, TypeError), match=G_WORD):
        lasp.lasp_attention(q, k, v, g=torch.zeros(shape), layout="bnhd")


def test_bad_gate_types(lasp):
    q, k, v, (B, H, N) = _small()
    for dt in (torch.int32, torch.int64, torch.bool):
        with pytest.raises((ValueError, TypeError), match=G_WORD):
            lasp.lasp_attention(q, k, v, g=torch.zeros(B, H, N, dtype=dt))
    with pytest.raises((ValueError, TypeError), match=G_WORD):
        lasp.lasp_attention(q, k, v, g=[[[0.0] * N] * H] * B)
    with pytest.raises((ValueError, TypeError), match=G_WORD):  # another device
        lasp.lasp_attention(q, k, v, g=torch.zeros(B, H, N, device="meta"))


def test_decay_takes_no_gradient_with_gates(lasp):
    q, k, v, (B, H, N) = _small()
    decay = torch.full((H,), 0.3, requires_grad=True)
    with pytest.raises((ValueError, RuntimeError), match="decay"):
        lasp.lasp_attention(q, k, v, decay, g=torch.zeros(B, H, N, requires_grad=True))


@pytest.mark.parametrize("maps", [(4, 4, 4), (4, 2, 2), (2, 2, 4)], ids=["mha", "gqa", "gva"])
def test_final_state_terms_by_token_blocks(lasp, maps, seed, monkeypatch):
    """The final-state cotangent's terms (added after the fused backward, by blocks of tokens) do not depend
    on the block size: one token per block against the default (one block here)."""
    Hq, Hk, Hv = maps
    H = max(Hq, Hv)
    g_ = gen(seed)
    N, D, E = 37, 5, 3
    q, k, v = randn((1, Hq, N, D), g_, F64), randn((1, Hk, N, D), g_, F64), randn((1, Hv, N, E), g_, F64)
    g = -F.softplus(randn((1, H, N), g_, F64))
    g[:, :, 11] = NEG_INF
    s0, dS, do = randn((1, H, D, E), g_, F64), randn((1, H, D, E), g_, F64), randn((1, H, N, E), g_, F64)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
        o, f = lasp.lasp_attention(*leaves[:3], torch.rand(H, generator=gen(1), dtype=torch.float32) * 0.1,
                                   g=leaves[3], initial_state=leaves[4], output_final_state=True)
        return torch.autograd.grad([o, f], leaves, [do, dS])

    whole = run()
    monkeypatch.setenv("LASP_GATED_G_BLOCK_BYTES", "1")
    blocked = run()
    for name, a, b in zip(["dq", "dk", "dv", "dg", "ds0"], blocked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_thread_value_checks(lasp):
    """A thread's own value-check setting (what gated_delta_attention sets around its C++ ops under a group,
    after reading g itself): it turns the checks off in that thread only, the process-wide setting stays in
    the others, -1 follows it again, and the call returns the setting it replaces; other modes raise."""
    import threading

    q, k, v, (B, H, N) = _small()
    g = -torch.rand(B, H, N)
    g[0, 0, 1] = 0.5
    beta = torch.rand(B, H, N)
    seen = {}

    def other():
        seen["checks"] = lasp.get_value_checks()
        try:
            lasp.gated_delta_attention(q, k, v, g, beta)
        except ValueError as e:
            seen["error"] = str(e)

    assert torch.ops.lasp._thread_value_checks(0) == -1
    try:
        assert lasp.get_value_checks() is False
        assert torch.isfinite(torch.ops.lasp.gated_delta_attention(q, k, v, g, beta, 0.5, None, False, None,
                                                                   "ring")[0]).all()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen["checks"] is True and "g must be <= 0" in seen["error"]
    finally:
        assert torch.ops.lasp._thread_value_checks(-1) == 0
    assert lasp.get_value_checks() is True
    with pytest.raises(ValueError, match="g must be <= 0"):
        torch.ops.lasp.gated_delta_attention(q, k, v, g, beta, 0.5, None, False, None, "ring")
    with pytest.raises(ValueError, match="mode must be 1 .on., 0 .off. or -1"):
        torch.ops.lasp._thread_value_checks(2)
