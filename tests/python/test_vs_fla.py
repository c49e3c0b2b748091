"""lasp's CUDA ops against an outside implementation: flash-linear-attention's chunked Triton kernels.

On the same bf16 inputs each case runs the lasp op, fla's kernel and the float64 token-by-token recurrence
(lasp.reference), forward (o, final states) and backward (the gradients of every input, through o and the
final states), and checks:
  * fla's forward output against float64 (relative error <= FLA_FWD_SANE): fla's call computes the
    reference's function, so the mapping of arguments between the two libraries is right;
  * for every output and gradient, lasp's relative error against float64 <= 2 x fla's (capped at
    FLA_ERR_CAP) + the bf16 floor: lasp is no less accurate than fla (flash-attention's rule, with fla in
    place of the reference computed in bf16).
Pairs:
  lasp_attention(q, k, v, decay)            fla.ops.simple_gla.chunk_simple_gla(q, k, v, g_gamma=-decay)
  lasp_attention(q, k, v, decay, g=g)       chunk_simple_gla(q, k, v, g=g - decay)
  ... with cu_seqlens (B = 1)               ... with cu_seqlens
  gated_delta_attention(q, k, v, g, beta)   fla.ops.gated_delta_rule.chunk_gated_delta_rule (GVA, l2norm,
                                            cu_seqlens), under LASP_DELTA_KERNELS=cuda and =fused
every lasp call in fla's layout (layout="bnhd"). fla 0.6.0 refuses its gated backward on Hopper under Triton
3.4 to 3.7.0 (its issue 640: wrong gradients); the refusal is lifted here, as in the benchmarks, and fla's
errors against float64 are printed in every failure message, so a wrong fla gradient shows as such.

Skips, with the reason, without a CUDA device or where fla does not import.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, LOWP_FLOOR, NO_CUDA_REASON, gen, randn, ref, rel_err

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)

BF16 = torch.bfloat16
F64 = torch.float64
FLA_FWD_SANE = 3e-2  # bf16 errors of a right implementation are ~5e-3; a wrong mapping gives O(1)
FLA_ERR_CAP = 5e-2   # a wrong fla gradient must not loosen lasp's bound
DEV = "cuda"


@pytest.fixture(scope="module")
def fla(request):
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - any import failure means: no fla here
        pytest.skip(f"fla not importable ({type(e).__name__}: {e})")
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception:  # noqa: BLE001
        chunk_o = None
    lifted = chunk_o is not None and getattr(chunk_o, "IS_NVIDIA_HOPPER", False)
    if lifted:
        chunk_o.IS_NVIDIA_HOPPER = False  # the refusal's switch, read at call time
    yield {"simple_gla": chunk_simple_gla, "gated_delta": chunk_gated_delta_rule}
    if lifted:
        chunk_o.IS_NVIDIA_HOPPER = True


def _varlen(fn, cu):
    """fla's keyword arguments for packed documents (cu_seqlens_cpu too where fla takes it)."""
    if cu is None:
        return {}
    kw = {"cu_seqlens": cu}
    if "cu_seqlens_cpu" in inspect.signature(fn).parameters:
        kw["cu_seqlens_cpu"] = cu.cpu()
    return kw


def _check(results, names):
    """results: {"lasp": {...}, "fla": {...}, "ref": {...}} of float tensors in one layout."""
    fla_o = rel_err(results["fla"]["o"], results["ref"]["o"])
    assert fla_o <= FLA_FWD_SANE, (f"fla's forward is off the float64 recurrence (rel. error {fla_o:.3e}): the "
                                   "test's mapping of arguments to fla is wrong")
    report = []
    for n in names:
        r = results["ref"][n]
        e_l, e_f = rel_err(results["lasp"][n], r), rel_err(results["fla"][n], r)
        report.append(f"{n}: lasp {e_l:.2e} fla {e_f:.2e}")
        tol = 2 * min(e_f, FLA_ERR_CAP) + LOWP_FLOOR[BF16]
        assert e_l <= tol, f"{n}: lasp's error {e_l:.3e} > {tol:.3e} (fla's {e_f:.3e}); all: {'; '.join(report)}"
    print("; ".join(report))


def _grads(outs, cots, leaves, keys):
    gr = torch.autograd.grad(outs, [leaves[k] for k in keys], cots, allow_unused=True)
    return {f"d{k}": (torch.zeros_like(leaves[k]) if x is None else x) for k, x in zip(keys, gr)}


def _docs(N, lens):
    assert sum(lens) == N
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return cu


# ---------------------------------------------------------------------------------------------------------
# lasp_attention against chunk_simple_gla

SIMPLE = [
    # (B, H, N, D, E, decay, g, init, docs)
    (2, 4, 700, 64, 64, True, False, True, None),
    (1, 3, 1000, 128, 128, True, True, True, None),
    (2, 2, 333, 96, 64, False, True, False, None),
    (1, 2, 300, 256, 64, True, True, True, None),
    (1, 4, 900, 128, 128, True, True, True, [1, 200, 64, 335, 300]),
    (1, 2, 400, 64, 128, False, True, False, [130, 1, 269]),
]


@pytest.mark.parametrize("B,H,N,D,E,use_decay,use_g,use_init,docs", SIMPLE)
def test_lasp_attention_vs_chunk_simple_gla(lasp, fla, seed, B, H, N, D, E, use_decay, use_g, use_init, docs):
    dev = DEV
    g_ = gen(seed)
    q = randn((B, N, H, D), g_, BF16, dev)
    k = randn((B, N, H, D), g_, BF16, dev, scale=D ** -0.5)
    v = randn((B, N, H, E), g_, BF16, dev)
    decay = (torch.rand(H, generator=g_) * 0.1).to(dev) if use_decay else None
    g = (-F.softplus(randn((B, N, H), g_) - 2.0)).to(dev) if use_g else None
    n_states = len(docs) if docs else B
    s0 = randn((n_states, H, D, E), g_, torch.float32, dev) if use_init else None
    do = randn((B, N, H, E), g_, BF16, dev)
    dS = randn((n_states, H, D, E), g_, torch.float32, dev)
    cu = _docs(N, docs).to(dev) if docs else None
    scale = D ** -0.5
    keys = ["q", "k", "v"] + (["g"] if use_g else []) + (["s0"] if use_init else [])

    def leaves():
        x = {"q": q, "k": k, "v": v, "g": g, "s0": s0}
        return {n: x[n].detach().clone().requires_grad_() for n in keys}

    # lasp
    L = leaves()
    o, fin = lasp.lasp_attention(L["q"], L["k"], L["v"], decay, g=L.get("g"), scale=scale,
                                 initial_state=L.get("s0"), output_final_state=True, layout="bnhd", cu_seqlens=cu)
    res_l = {"o": o.detach(), "f": fin.detach(), **_grads([o, fin], [do, dS], L, keys)}
    # fla: the same effective log gates
    Fl = leaves()
    fn = fla["simple_gla"]
    gate = {}
    if use_g:
        gate["g"] = Fl["g"] - (decay[None, None, :] if use_decay else 0.0)
    elif use_decay:
        gate["g_gamma"] = -decay
    o, fin = fn(Fl["q"], Fl["k"], Fl["v"], scale=scale, initial_state=Fl.get("s0"), output_final_state=True,
                **gate, **_varlen(fn, cu))
    res_f = {"o": o.detach(), "f": fin.detach(), **_grads([o, fin], [do, dS], Fl, keys)}
    # float64, token by token, per document (layout bhnd)
    t = lambda x: None if x is None else x.detach().to(F64).transpose(1, 2)  # noqa: E731
    bounds = cu.tolist() if docs else None
    segs = list(zip(bounds[:-1], bounds[1:])) if docs else [(0, N)]
    parts = []
    for i, (s, e) in enumerate(segs):
        sl = slice(s, e)
        init = None if s0 is None else (s0[i:i + 1] if docs else s0)
        parts.append(ref.gated_recurrent_grads(
            t(q[:, sl]), t(k[:, sl]), t(v[:, sl]), None if g is None else t(g[:, sl]), decay, scale, init,
            t(do[:, sl]), d_final=dS[i:i + 1] if docs else dS))
    cat = lambda n: torch.cat([p[n] for p in parts], dim=2).transpose(1, 2)  # noqa: E731
    res_r = {"o": cat("o"), "dq": cat("dq"), "dk": cat("dk"), "dv": cat("dv"),
             "f": torch.cat([p["final_state"] for p in parts], 0)}
    if use_g:
        res_r["dg"] = torch.cat([p["dg"] for p in parts], dim=2).transpose(1, 2)
    if use_init:
        res_r["ds0"] = torch.cat([p["d_initial_state"] for p in parts], 0)
    _check({"lasp": res_l, "fla": res_f, "ref": res_r}, ["o", "f"] + [f"d{n}" for n in keys])


# ---------------------------------------------------------------------------------------------------------
# gated_delta_attention against chunk_gated_delta_rule

DELTA = [
    # (B, Hqk, H, N, D, E, l2norm, init, docs)
    (2, 4, 4, 600, 128, 128, True, True, None),
    (1, 2, 4, 500, 64, 128, True, False, None),          # GVA: 2 q / k heads, 4 value heads
    (1, 2, 2, 300, 256, 64, True, True, None),
    (1, 3, 3, 257, 96, 96, False, True, None),           # k unit rows given, no l2norm in the op
    (1, 4, 4, 700, 128, 128, True, True, [5, 300, 1, 394]),
]


@pytest.mark.parametrize("kernels", ["cuda", "fused"])
@pytest.mark.parametrize("B,Hqk,H,N,D,E,l2,use_init,docs", DELTA)
def test_gated_delta_vs_chunk_gated_delta_rule(lasp, fla, seed, monkeypatch, kernels, B, Hqk, H, N, D, E, l2,
                                               use_init, docs):
    monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
    dev = DEV
    g_ = gen(seed)
    q = randn((B, N, Hqk, D), g_, torch.float32)
    k = randn((B, N, Hqk, D), g_, torch.float32)
    if not l2:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    q, k = q.to(dev, BF16), k.to(dev, BF16)
    v = randn((B, N, H, E), g_, BF16, dev)
    g = (F.logsigmoid(randn((B, N, H), g_)) / 4).to(dev)
    beta = torch.sigmoid(randn((B, N, H), g_)).to(dev)
    n_states = len(docs) if docs else B
    s0 = randn((n_states, H, D, E), g_, torch.float32, dev, scale=0.1) if use_init else None
    do = randn((B, N, H, E), g_, BF16, dev)
    dS = randn((n_states, H, D, E), g_, torch.float32, dev)
    cu = _docs(N, docs).to(dev) if docs else None
    scale = D ** -0.5
    keys = ["q", "k", "v", "g", "beta"] + (["s0"] if use_init else [])

    def leaves(dtype=None):
        x = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "s0": s0}
        return {n: (x[n].detach().to(dtype) if dtype else x[n].detach().clone()).requires_grad_() for n in keys}

    L = leaves()
    o, fin = lasp.gated_delta_attention(L["q"], L["k"], L["v"], L["g"], L["beta"], scale=scale,
                                        initial_state=L.get("s0"), output_final_state=True, layout="bnhd",
                                        cu_seqlens=cu, use_qk_l2norm=l2)
    res_l = {"o": o.detach(), "f": fin.detach(), **_grads([o, fin], [do, dS], L, keys)}
    Fl = leaves()
    fn = fla["gated_delta"]
    o, fin = fn(Fl["q"], Fl["k"], Fl["v"], Fl["g"], Fl["beta"], scale=scale, initial_state=Fl.get("s0"),
                output_final_state=True, use_qk_l2norm_in_kernel=l2, **_varlen(fn, cu))
    res_f = {"o": o.detach(), "f": fin.detach(), **_grads([o, fin], [do, dS], Fl, keys)}
    # float64 recurrence per document, differentiated by autograd (layout bhnd inside)
    R = leaves(F64)
    bounds = cu.tolist() if docs else [0, N]
    outs, fins = [], []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        tr = lambda x: x[:, s:e].transpose(1, 2)  # noqa: E731
        init = R["s0"][i:i + 1] if (use_init and docs) else R.get("s0")
        o_i, f_i = ref.gated_delta_recurrent(tr(R["q"]), tr(R["k"]), tr(R["v"]), tr(R["g"]), tr(R["beta"]),
                                             scale=scale, initial_state=init, use_qk_l2norm=l2)
        outs.append(o_i.transpose(1, 2))
        fins.append(f_i)
    o, fin = torch.cat(outs, 1), torch.cat(fins, 0)
    res_r = {"o": o.detach(), "f": fin.detach(), **_grads([o, fin], [do.to(F64), dS.to(F64)], R, keys)}
    _check({"lasp": res_l, "fla": res_f, "ref": res_r}, ["o", "f"] + [f"d{n}" for n in keys])
