"""reference.gated_delta_recurrent: the gated delta rule (Gated DeltaNet) in float64, token by token.

Checked against a scalar loop straight from the formula (python floats, every head map), against the
rule's defining properties (beta = 0 only decays; beta = 1 with a unit key stores v exactly under that
key), by gradcheck, and against fla's naive_recurrent_gated_delta_rule where fla imports.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import gen, randn, ref

F64 = torch.float64


def _scalar_loop(q, k, v, g, beta, scale, s0):
    """o and the final state from the formula with python floats (bhnd, head maps by index)."""
    B, Hq, N, D = q.shape
    Hk, Hv, E = k.shape[1], v.shape[1], v.shape[3]
    H = max(Hq, Hv)
    o = [[[[0.0] * E for _ in range(N)] for _ in range(H)] for _ in range(B)]
    fin = [[None] * H for _ in range(B)]
    for b in range(B):
        for h in range(H):
            hq, hk, hv = h // (H // Hq), h // (H // Hk), h // (H // Hv)
            S = [[float(s0[b, h, d, e]) for e in range(E)] for d in range(D)]
            for t in range(N):
                a, bt = math.exp(float(g[b, h, t])), float(beta[b, h, t])
                kv = [float(k[b, hk, t, d]) for d in range(D)]
                S = [[a * S[d][e] for e in range(E)] for d in range(D)]
                kS = [sum(kv[d] * S[d][e] for d in range(D)) for e in range(E)]
                u = [bt * (float(v[b, hv, t, e]) - kS[e]) for e in range(E)]
                S = [[S[d][e] + kv[d] * u[e] for e in range(E)] for d in range(D)]
                for e in range(E):
                    o[b][h][t][e] = scale * sum(float(q[b, hq, t, d]) * S[d][e] for d in range(D))
            fin[b][h] = S
    return torch.tensor(o, dtype=F64), torch.tensor(fin, dtype=F64)


def _problem(B, Hq, Hk, Hv, N, D, E, seed):
    H = max(Hq, Hv)
    g_ = gen(seed)
    q, k, v = randn((B, Hq, N, D), g_, F64), randn((B, Hk, N, D), g_, F64), randn((B, Hv, N, E), g_, F64)
    g = -torch.nn.functional.softplus(randn((B, H, N), g_, F64))
    beta = torch.sigmoid(randn((B, H, N), g_, F64))
    s0 = randn((B, H, D, E), g_, F64)
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("maps", [(2, 2, 2), (1, 1, 3), (2, 1, 4), (4, 2, 2)], ids=["mha", "gva", "gva-gk", "gqa"])
def test_matches_scalar_loop(maps):
    q, k, v, g, beta, s0 = _problem(1, *maps, 6, 3, 2, seed=sum(maps))
    o, fin = ref.gated_delta_recurrent(q, k, v, g, beta, 0.7, s0)
    o_s, fin_s = _scalar_loop(q, k, v, g, beta, 0.7, s0)
    assert torch.allclose(o, o_s, rtol=1e-12, atol=1e-12)
    assert torch.allclose(fin, fin_s, rtol=1e-12, atol=1e-12)


def test_beta_zero_only_decays():
    q, k, v, g, beta, s0 = _problem(2, 2, 2, 2, 7, 4, 3, seed=3)
    o, fin = ref.gated_delta_recurrent(q, k, v, g, torch.zeros_like(beta), None, s0)
    decay = torch.exp(torch.cumsum(g, -1))  # (B, H, N)
    want = (q @ s0) * decay[..., None] / math.sqrt(4)
    assert torch.allclose(o, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(fin, s0 * decay[..., -1, None, None], rtol=1e-12, atol=1e-12)


def test_unit_key_with_beta_one_stores_v():
    """beta = 1 and ||k|| = 1: after token t the state maps k[t] to v[t] exactly (the delta rule's overwrite)."""
    q, k, v, g, beta, s0 = _problem(1, 2, 2, 2, 5, 4, 3, seed=4)
    k = k / k.norm(dim=-1, keepdim=True)
    for t in range(1, 6):
        _, S = ref.gated_delta_recurrent(q[:, :, :t], k[:, :, :t], v[:, :, :t], g[:, :, :t],
                                         torch.ones_like(beta[:, :, :t]), None, s0)
        read = (k[:, :, t - 1, None, :] @ S)[:, :, 0]
        assert torch.allclose(read, v[:, :, t - 1], rtol=1e-12, atol=1e-12)


def test_gradcheck():
    q, k, v, g, beta, s0 = _problem(1, 1, 1, 2, 4, 3, 2, seed=5)
    ins = tuple(t.clone().requires_grad_() for t in (q, k, v, g, beta, s0))

    def f(q, k, v, g, beta, s0):
        o, fin = ref.gated_delta_recurrent(q, k, v, g, beta, None, s0, use_qk_l2norm=True)
        return o, fin

    assert torch.autograd.gradcheck(f, ins)


def test_bad_shapes_name_the_argument():
    q, k, v, g, beta, s0 = _problem(1, 2, 2, 2, 4, 3, 2, seed=6)
    with pytest.raises(ValueError, match="beta must have shape"):
        ref.gated_delta_recurrent(q, k, v, g, beta[:, :1], None, s0)
    with pytest.raises(ValueError, match="k has 3 heads"):
        ref.gated_delta_recurrent(q, torch.cat([k, k[:, :1]], 1), v, g, beta, None, s0)


def test_matches_fla_naive():
    """fla's naive recurrence (float32, layout (B, N, H, .)) on the same values, MHA and l2-normalised q, k."""
    try:
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fla not importable ({type(e).__name__}: {e})")
    q, k, v, g, beta, s0 = _problem(2, 3, 3, 3, 20, 8, 5, seed=7)
    for l2 in (False, True):
        o, fin = ref.gated_delta_recurrent(q, k, v, g, beta, None, s0, use_qk_l2norm=l2)
        qq, kk = q, k
        if l2:
            qq = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
            kk = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        of, ff = naive_recurrent_gated_delta_rule(t(qq), t(kk), t(v), t(beta), t(g), None, s0, True)
        assert torch.allclose(t(of).double(), o, rtol=1e-4, atol=1e-4)
        assert torch.allclose(ff.double(), fin, rtol=1e-4, atol=1e-4)
