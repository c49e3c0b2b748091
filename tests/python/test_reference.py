"""The fp64 references check each other and a brute-force token loop.

These run without the compiled extension (the reference is loaded from its file by conftest).
"""

import math

import pytest
import torch

from conftest import gen, make_decay, randn, ref, rel_err

F64 = torch.float64


def brute_force(q, k, v, decay, scale, s0):
    """Token-by-token scalar loop straight from the formula in docs/design.md (bhnd, python floats)."""
    B, H, N, D = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    group = H // Hkv
    o = torch.zeros(B, H, N, E, dtype=F64)
    fin = torch.zeros(B, H, D, E, dtype=F64)
    for b in range(B):
        for h in range(H):
            kh = h // group
            lam = 0.0 if decay is None else float(decay[h])
            gam = math.exp(-lam)
            for t in range(N):
                for e in range(E):
                    acc = 0.0
                    if s0 is not None:
                        for d in range(D):
                            acc += gam ** (t + 1) * float(q[b, h, t, d]) * float(s0[b, h, d, e])
                    for s in range(t + 1):
                        dot = sum(float(q[b, h, t, d]) * float(k[b, kh, s, d]) for d in range(D))
                        acc += gam ** (t - s) * dot * float(v[b, kh, s, e])
                    o[b, h, t, e] = scale * acc
            for d in range(D):
                for e in range(E):
                    acc = 0.0 if s0 is None else gam**N * float(s0[b, h, d, e])
                    for s in range(N):
                        acc += gam ** (N - 1 - s) * float(k[b, kh, s, d]) * float(v[b, kh, s, e])
                    fin[b, h, d, e] = acc
    return o, fin


def _inputs(seed, B, H, Hkv, N, D, E, decay_kind, with_state):
    g = gen(seed)
    q = randn((B, H, N, D), g, F64)
    k = randn((B, Hkv, N, D), g, F64)
    v = randn((B, Hkv, N, E), g, F64)
    s0 = randn((B, H, D, E), g, F64) if with_state else None
    decay = make_decay(decay_kind, H, g=g)
    return q, k, v, decay, s0


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay_kind", [None, "alibi", "mixed"])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (3, 1)])
def test_references_match_brute_force(H, Hkv, decay_kind, with_state):
    seed = 1000 + 17 * H + 5 * Hkv + 3 * with_state + (0 if decay_kind is None else len(decay_kind))
    B, N, D, E = 2, 6, 3, 4
    q, k, v, decay, s0 = _inputs(seed, B, H, Hkv, N, D, E, decay_kind, with_state)
    scale = 0.7
    o_bf, f_bf = brute_force(q, k, v, decay, scale, s0)
    for fn in (ref.attention_ref, ref.attention_recurrent_ref):
        o, f = fn(q, k, v, decay, scale, s0)
        assert o.dtype == F64 and f.dtype == F64
        assert o.shape == (B, H, N, E) and f.shape == (B, H, D, E)
        assert rel_err(o, o_bf) < 1e-13, fn.__name__
        assert rel_err(f, f_bf) < 1e-13, fn.__name__


CASES = [
    # B, H, Hkv, N, D, E, decay, state, layout
    (1, 1, 1, 1, 4, 4, None, False, "bhnd"),
    (2, 4, 4, 63, 8, 12, "alibi", True, "bhnd"),
    (2, 4, 2, 64, 6, 5, "strong", True, "bnhd"),
    (1, 4, 1, 65, 5, 9, "mixed", False, "bnhd"),
    (1, 2, 2, 300, 4, 3, "alibi", True, "bhnd"),
    (1, 2, 1, 200, 4, 4, "strong", True, "bhnd"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_two_references_agree(case):
    B, H, Hkv, N, D, E, decay_kind, with_state, layout = case
    g = gen(2000 + N + H)
    if layout == "bhnd":
        q, k, v = randn((B, H, N, D), g, F64), randn((B, Hkv, N, D), g, F64), randn((B, Hkv, N, E), g, F64)
    else:
        q, k, v = randn((B, N, H, D), g, F64), randn((B, N, Hkv, D), g, F64), randn((B, N, Hkv, E), g, F64)
    s0 = randn((B, H, D, E), g, F64) if with_state else None
    decay = make_decay(decay_kind, H, g=g)
    for t in (q, k, v) + ((s0,) if s0 is not None else ()):
        t.requires_grad_(True)
    o1, f1 = ref.attention_ref(q, k, v, decay, None, s0, layout)
    o2, f2 = ref.attention_recurrent_ref(q, k, v, decay, None, s0, layout)
    exp_o = (B, H, N, E) if layout == "bhnd" else (B, N, H, E)
    assert o1.shape == exp_o and o2.shape == exp_o
    assert torch.isfinite(o1).all() and torch.isfinite(f1).all()
    assert rel_err(o1, o2) < 1e-12
    assert rel_err(f1, f2) < 1e-12
    # Gradients of both formulations agree too (the op tests take gradients from attention_ref).
    do, dS = torch.randn_like(o1), torch.randn_like(f1)
    ins = [t for t in (q, k, v, s0) if t is not None]
    g1 = torch.autograd.grad([o1, f1], ins, [do, dS])
    g2 = torch.autograd.grad([o2, f2], ins, [do, dS])
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-12
    # The recurrence run forward and backward by hand (no autograd) gives the same outputs and gradients.
    r = ref.attention_recurrent_grads(q.detach(), k.detach(), v.detach(), decay, None,
                                      None if s0 is None else s0.detach(), do, dS, layout)
    assert rel_err(r["o"], o1) < 1e-12
    assert rel_err(r["final_state"], f1) < 1e-12
    names = ["dq", "dk", "dv"] + (["d_initial_state"] if s0 is not None else [])
    for name, a in zip(names, g1):
        assert r[name].shape == a.shape, name
        assert rel_err(r[name], a) < 1e-12, name


def test_default_scale_is_inverse_sqrt_d():
    q, k, v, decay, s0 = _inputs(3, 1, 2, 2, 9, 7, 3, "alibi", True)
    o_default, f_default = ref.attention_ref(q, k, v, decay, None, s0)
    o_explicit, f_explicit = ref.attention_ref(q, k, v, decay, 1 / math.sqrt(7), s0)
    o_one, _ = ref.attention_ref(q, k, v, decay, 1.0, s0)
    assert rel_err(o_default, o_explicit) < 1e-15
    assert rel_err(o_one, o_explicit) > 0.1  # scale actually matters
    assert rel_err(f_default, f_explicit) < 1e-15  # the state does not depend on scale


def test_layout_bnhd_is_transposed_bhnd():
    q, k, v, decay, s0 = _inputs(4, 2, 4, 2, 11, 5, 6, "mixed", True)
    o1, f1 = ref.attention_ref(q, k, v, decay, None, s0, "bhnd")
    o2, f2 = ref.attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), decay, None, s0, "bnhd")
    assert o2.shape == (2, 11, 4, 6)
    assert torch.equal(o2.transpose(1, 2), o1)
    assert torch.equal(f1, f2)
    with pytest.raises(ValueError):
        ref.attention_ref(q, k, v, decay, None, s0, "bnd")


def test_gqa_head_mapping():
    """Query head h reads kv head h // (H / Hkv) (consecutive query heads share a kv head)."""
    B, H, Hkv, N, D, E = 1, 6, 3, 8, 4, 5
    q, k, v, decay, _ = _inputs(5, B, H, Hkv, N, D, E, "alibi", False)
    o, f = ref.attention_ref(q, k, v, decay)
    for h in range(H):
        kh = h // 2
        oh, fh = ref.attention_ref(q[:, h : h + 1], k[:, kh : kh + 1], v[:, kh : kh + 1], decay[h : h + 1])
        assert torch.allclose(o[:, h : h + 1], oh, rtol=1e-14, atol=1e-14)
        assert torch.allclose(f[:, h : h + 1], fh, rtol=1e-14, atol=1e-14)
    # ... and not h % Hkv: heads 1 and 3 use different kv heads (0 and 1) under the right mapping.
    o_wrong, _ = ref.attention_ref(q[:, 1:2], k[:, 1:2], v[:, 1:2], decay[1:2])
    assert rel_err(o[:, 1:2], o_wrong) > 0.1


def test_huge_decay_has_no_inf_or_nan():
    lam = torch.tensor([0.0, 1.0, 50.0, 800.0], dtype=F64)
    M = ref.decay_matrix(lam, 120)
    assert torch.isfinite(M).all()
    assert torch.equal(torch.triu(M, diagonal=1), torch.zeros_like(M))
    assert torch.equal(torch.diagonal(M, dim1=-2, dim2=-1), torch.ones(4, 120, dtype=F64))
    assert torch.equal(M[0], torch.tril(torch.ones(120, 120, dtype=F64)))
    assert abs(M[1, 10, 3].item() - math.exp(-7.0)) < 1e-15
    q, k, v, _, s0 = _inputs(6, 1, 4, 4, 120, 3, 3, None, True)
    o, f = ref.attention_ref(q, k, v, lam, None, s0)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    # With lambda = 800, gamma^1 underflows: o[t] = scale (q[t].k[t]) v[t] and final = k^T v of the last token.
    scale = 1 / math.sqrt(3)
    o_diag = scale * (q[0, 3] * k[0, 3]).sum(-1, keepdim=True) * v[0, 3]
    assert torch.allclose(o[0, 3], o_diag, rtol=1e-13, atol=1e-13)
    assert torch.allclose(f[0, 3], torch.outer(k[0, 3, -1], v[0, 3, -1]), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("split", [1, 13, 31])
def test_state_carry_matches_one_pass(split):
    """Two calls with final_state carried as initial_state equal one call (the chunked/ring math)."""
    q, k, v, decay, s0 = _inputs(7 + split, 2, 4, 2, 32, 5, 6, "mixed", True)
    o, f = ref.attention_ref(q, k, v, decay, None, s0)
    o1, f1 = ref.attention_ref(q[:, :, :split], k[:, :, :split], v[:, :, :split], decay, None, s0)
    o2, f2 = ref.attention_ref(q[:, :, split:], k[:, :, split:], v[:, :, split:], decay, None, f1)
    assert rel_err(torch.cat([o1, o2], dim=2), o) < 1e-13
    assert rel_err(f2, f) < 1e-13
    # Without carrying the state the second half is wrong: the test can fail.
    o2_nocarry, _ = ref.attention_ref(q[:, :, split:], k[:, :, split:], v[:, :, split:], decay, None, None)
    assert rel_err(o2_nocarry, o[:, :, split:]) > 1e-3


def test_empty_sequence():
    q, k, v, decay, s0 = _inputs(8, 2, 2, 1, 0, 3, 4, "alibi", True)
    for fn in (ref.attention_ref, ref.attention_recurrent_ref):
        o, f = fn(q, k, v, decay, None, s0)
        assert o.shape == (2, 2, 0, 4)
        assert torch.equal(f, s0)  # gamma^0 S0
        o, f = fn(q, k, v, decay, None, None)
        assert torch.equal(f, torch.zeros(2, 2, 3, 4, dtype=F64))


@pytest.mark.parametrize("dtype,lo,hi", [(torch.float16, 1e-5, 3e-3), (torch.bfloat16, 1e-4, 3e-2)])
def test_low_precision_reference_error_is_small_but_nonzero(dtype, lo, hi):
    """The dtype reference used by the tolerance rule has a realistic error: nonzero and small."""
    g = gen(9)
    B, H, Hkv, N, D, E = 1, 2, 1, 100, 16, 16
    q, k, v = (randn(s, g, dtype) for s in [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E)])
    s0 = randn((B, H, D, E), g, torch.float32)
    decay = make_decay("alibi", H)
    o64, f64 = ref.attention_ref(q, k, v, decay, None, s0)
    olp, flp = ref.attention_ref(q, k, v, decay, None, s0, compute_dtype=dtype)
    assert olp.dtype == dtype
    assert lo < rel_err(olp, o64) < hi
    assert lo < rel_err(flp, f64) < hi


# ----------------------------------------------------------------------------------------------
# Per-token gates and head groups: the hand-written backward against autograd through the recurrence


def _gated_autograd(q, k, v, g, decay, scale, s0):
    """The gated recurrence written plainly, differentiated by autograd (the check of the hand-written one)."""
    B, Hq, N, D = q.shape
    Hk, Hv, E = k.shape[1], v.shape[1], v.shape[3]
    H = max(Hq, Hv)
    qh, kh, vh = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (q, k, v))
    lg = g - decay[None, :, None]
    S = s0
    outs = []
    for t in range(N):
        S = torch.exp(lg[:, :, t])[..., None, None] * S + kh[:, :, t, :, None] * vh[:, :, t, None, :]
        outs.append(scale * (qh[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(outs, 2), S


@pytest.mark.parametrize("heads", [(4, 4, 4), (4, 2, 4), (2, 2, 4), (1, 1, 4), (4, 1, 2), (2, 4, 4)],
                         ids=lambda h: "q{}k{}v{}".format(*h))
@pytest.mark.parametrize("resets", [False, True])
def test_gated_recurrent_grads_match_autograd(heads, resets):
    from lasp.reference import gated_recurrent_grads

    Hq, Hk, Hv = heads
    H = max(Hq, Hv)
    B, N, D, E = 2, 23, 5, 7
    g0 = gen(11 + Hq + 3 * Hk + 7 * Hv + resets)
    q = torch.randn(B, Hq, N, D, dtype=torch.float64, generator=g0).requires_grad_()
    k = torch.randn(B, Hk, N, D, dtype=torch.float64, generator=g0).requires_grad_()
    v = torch.randn(B, Hv, N, E, dtype=torch.float64, generator=g0).requires_grad_()
    gates = -torch.rand(B, H, N, dtype=torch.float64, generator=g0) * 0.5
    if resets:  # a reset at the first token, one inside, and one at the last
        gates[0, :, 0] = -math.inf
        gates[1, 0, 9] = -math.inf
        gates[:, -1, N - 1] = -math.inf
    gates.requires_grad_()
    decay = torch.rand(H, dtype=torch.float64, generator=g0) * 0.1
    s0 = torch.randn(B, H, D, E, dtype=torch.float64, generator=g0).requires_grad_()
    do = torch.randn(B, H, N, E, dtype=torch.float64, generator=g0)
    dfin = torch.randn(B, H, D, E, dtype=torch.float64, generator=g0)
    scale = 0.37

    got = gated_recurrent_grads(q.detach(), k.detach(), v.detach(), gates.detach(), decay, scale, s0.detach(),
                                do, dfin)
    o, fin = _gated_autograd(q, k, v, gates, decay, scale, s0)
    dq, dk, dv, dg, ds0 = torch.autograd.grad((o * do).sum() + (fin * dfin).sum(), (q, k, v, gates, s0))
    want = {"o": o, "final_state": fin, "dq": dq, "dk": dk, "dv": dv, "dg": dg, "d_initial_state": ds0}
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert rel_err(got[name], w.detach()) < 1e-12, f"{name}: {rel_err(got[name], w.detach()):.2e}"
    if resets:  # a reset cuts the chain: the gate there gets no gradient, and nothing before it reaches o after
        assert torch.all(got["dg"][0, :, 0] == 0) and got["dg"][1, 0, 9] == 0


def test_gated_recurrent_grads_without_gates_is_the_decay_recurrence():
    from lasp.reference import attention_recurrent_grads, gated_recurrent_grads

    g0 = gen(5)
    B, H, Hkv, N, D, E = 1, 4, 2, 17, 6, 3
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=g0)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=g0)
    v = torch.randn(B, Hkv, N, E, dtype=torch.float64, generator=g0)
    decay = torch.rand(H, dtype=torch.float64, generator=g0)
    s0 = torch.randn(B, H, D, E, dtype=torch.float64, generator=g0)
    do = torch.randn(B, H, N, E, dtype=torch.float64, generator=g0)
    a = attention_recurrent_grads(q, k, v, decay, 0.5, s0, do)
    b = gated_recurrent_grads(q, k, v, None, decay, 0.5, s0, do)
    for name in ("o", "final_state", "dq", "dk", "dv", "d_initial_state"):
        assert rel_err(b[name], a[name]) < 1e-12, name
    with pytest.raises(ValueError, match="k has 3 heads"):
        gated_recurrent_grads(q, torch.zeros(B, 3, N, D), v, None, None, None, None, do)
