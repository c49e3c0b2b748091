"""lasp.gated_delta_attention (the gated delta rule in chunked WY form) against the float64 token-by-token
recurrence (lasp.reference.gated_delta_recurrent): outputs, final states and the gradients of q, k, v, g,
beta and the initial state, on fresh random inputs over head maps, odd head dims, several chunks (and a
partial last one), resets (g = -inf), both layouts and qk l2-normalisation; gradcheck in float64; packed
documents against each document alone; bad inputs raise errors that name the argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import gen, randn, rel_err

lasp_ref = pytest.importorskip("lasp.reference")
F64 = torch.float64


def _inputs(seed, B, Hq, Hk, Hv, N, D, E, dtype=F64, device="cpu", resets=True):
    g_ = gen(seed)
    H = max(Hq, Hv)
    q = randn((B, Hq, N, D), g_, dtype)
    k = randn((B, Hk, N, D), g_, dtype, scale=D ** -0.5)
    v = randn((B, Hv, N, E), g_, dtype)
    g = -F.softplus(randn((B, H, N), g_, F64) - 1.0)
    if resets and N > 2:
        g[:, :, N // 3] = float("-inf")
        g[0, 0, N - 1] = float("-inf")
    beta = torch.sigmoid(randn((B, H, N), g_, F64))
    s0 = randn((B, H, D, E), g_, F64)
    do = randn((B, H, N, E), g_, F64)
    dS = randn((B, H, D, E), g_, F64)
    return [t.to(device) for t in (q, k, v, g.to(dtype), beta.to(dtype), s0, do, dS)]


def _run(fn, q, k, v, g, beta, s0, do, dS, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, s0)]
    o, f = fn(*leaves[:5], initial_state=leaves[5], **kw)
    gr = torch.autograd.grad([o, f], leaves, [do.to(o.dtype), dS.to(f.dtype)])
    return dict(o=o.detach(), f=f.detach(), dq=gr[0], dk=gr[1], dv=gr[2], dg=gr[3], dbeta=gr[4], ds0=gr[5])


def _ours(lasp, **kw):
    return lambda *a, **k2: lasp.gated_delta_attention(*a, output_final_state=True, **kw, **k2)


def _ref(**kw):
    return lambda *a, **k2: lasp_ref.gated_delta_recurrent(*a, **kw, **k2)


SHAPES = [
    # (B, Hq, Hk, Hv, N, D, E)
    (2, 2, 2, 2, 150, 8, 6),     # three chunks, the last partial
    (1, 1, 1, 4, 70, 5, 7),      # GVA, odd dims
    (1, 4, 2, 2, 64, 16, 16),    # GQA, one full chunk
    (1, 2, 2, 2, 1, 3, 3),       # one token
    (1, 6, 2, 3, 129, 9, 4),     # mixed head map, a chunk of one token at the end
]


@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}q{s[1]}k{s[2]}v{s[3]}-N{s[4]}-D{s[5]}E{s[6]}" for s in SHAPES])
def test_matches_recurrence(lasp, shape, l2, seed):
    ins = _inputs(seed, *shape)
    got = _run(_ours(lasp, use_qk_l2norm=l2, scale=0.7), *ins)
    want = _run(_ref(use_qk_l2norm=l2, scale=0.7), *ins)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{key}: {m}")


def test_layout_bnhd_is_fla_layout(lasp, seed):
    q, k, v, g, beta, s0, do, dS = _inputs(seed, 2, 2, 2, 2, 90, 8, 8)
    o, f = lasp.gated_delta_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    t = _to_bnhd
    o2, f2 = lasp.gated_delta_attention(t(q), t(k), t(v), t(g), t(beta), initial_state=s0, output_final_state=True,
                                        layout="bnhd")
    torch.testing.assert_close(o2, t(o), rtol=0, atol=0)
    torch.testing.assert_close(f2, f, rtol=0, atol=0)


def _to_bnhd(x):
    """A (B, H, N, ...) tensor as a contiguous (B, N, H, ...) one (fla's layout)."""
    return x.transpose(1, 2).contiguous()


def _tokens_outer(x):
    """x (B, H, N, ...) with the memory order of (B, N, H, ...): the bhnd view of a bnhd tensor."""
    return _to_bnhd(x).transpose(1, 2)


def _dense_order(x):
    """The dims of x from the largest stride to the smallest (x's memory order)."""
    return sorted(range(x.dim()), key=lambda i: -x.stride(i))


LAYOUT_SHAPES = [
    # (B, Hq, Hk, Hv, N, D, E)
    (2, 2, 2, 2, 70, 8, 6),    # MHA
    (1, 1, 1, 4, 70, 5, 7),    # GVA: o laid out as v, dq / dk summed over the output heads
    (1, 4, 2, 2, 65, 6, 6),    # GQA: dk, dv summed
]


@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=["mha", "gva", "gqa"])
def test_outputs_and_gradients_keep_the_input_layout(lasp, shape, l2, seed):
    """o comes back in the layout asked for with the memory order of q (of v where v has more heads), and each
    input's gradient with that input's: for (B, N, H, D) tensors (layout bnhd, fla's) all of them are contiguous
    in that layout, not transposed views; for a non-dense input (q, k, v sliced out of one fused projection) the
    gradient is dense in the input's order. The values are those of the bhnd call."""
    ins = _inputs(seed, *shape)
    q, k, v, g, beta, s0, do, dS = ins
    want = _run(_ours(lasp, use_qk_l2norm=l2), *ins)
    t = _to_bnhd
    got = _run(_ours(lasp, use_qk_l2norm=l2, layout="bnhd"), t(q), t(k), t(v), t(g), t(beta), s0, t(do), dS)
    for key in ("o", "dq", "dk", "dv", "dg", "dbeta"):
        assert got[key].is_contiguous(), f"{key}: strides {got[key].stride()} for layout bnhd, want contiguous"
        torch.testing.assert_close(got[key], t(want[key]), rtol=1e-12, atol=1e-12, msg=lambda m: f"{key}: {m}")
    for key in ("o", "dq", "dk", "dv", "dg", "dbeta"):
        assert want[key].is_contiguous(), f"{key}: strides {want[key].stride()} for layout bhnd, want contiguous"
    # q, k, v as slices of one (B, N, 3, Hmax, X) projection: not dense
    B, Hq, Hk, Hv, N, D, E = shape
    fused = torch.zeros(B, N, 3, max(Hq, Hk, Hv), max(D, E), dtype=q.dtype)
    for i, x in enumerate((q, k, v)):
        fused[:, :, i, :x.shape[1], :x.shape[3]] = t(x)
    fused.requires_grad_()
    parts = [fused[:, :, i, :x.shape[1], :x.shape[3]] for i, x in enumerate((q, k, v))]
    assert not parts[0].is_contiguous()
    o = lasp.gated_delta_attention(*parts, t(g), t(beta), initial_state=s0, layout="bnhd", use_qk_l2norm=l2)
    grads = torch.autograd.grad(o, parts, t(do))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = lasp.gated_delta_attention(*leaves, g, beta, initial_state=s0, use_qk_l2norm=l2)
    for name, got_x, want_x, x in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(o_ref, leaves, do), parts):
        assert _dense_order(got_x) == _dense_order(x), f"{name}: strides {got_x.stride()} for {x.stride()}"
        assert got_x.is_contiguous(), f"{name}: strides {got_x.stride()}, want dense (B, N, H, X)"
        torch.testing.assert_close(got_x, t(want_x), rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_float32_close_to_recurrence(lasp, seed):
    q, k, v, g, beta, s0, do, dS = _inputs(seed, 1, 2, 2, 2, 200, 32, 32, dtype=torch.float32, resets=False)
    got = _run(_ours(lasp), q, k, v, g, beta, s0.float(), do, dS)
    want = _run(_ref(), *(t.double() for t in (q, k, v, g, beta, s0, do, dS)))
    for key, w in want.items():
        err = ((got[key].double() - w).norm() / w.norm()).item()
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


def test_gradcheck(lasp, seed):
    q, k, v, g, beta, s0, _, _ = _inputs(seed, 1, 1, 1, 2, 67, 3, 2, resets=False)
    g[:, :, 5] = float("-inf")  # a reset; its own entry is left out of the perturbed inputs below
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta, s0)]
    gfin = g.detach().clone()
    gmask = torch.isfinite(gfin)
    gv = gfin[gmask].clone().requires_grad_()

    def f(q, k, v, beta, s0, gv):
        gg = torch.full_like(gfin, float("-inf")).masked_scatter(gmask, gv)
        o, fs = lasp.gated_delta_attention(q, k, v, gg, beta, initial_state=s0, output_final_state=True)
        return o, fs

    assert torch.autograd.gradcheck(f, leaves + [gv], eps=1e-6, atol=1e-6)


def test_packed_documents_match_each_alone(lasp, seed):
    lens = [5, 1, 70, 1, 30]
    N = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta, _, do, _ = _inputs(seed, 1, 2, 1, 2, N, 6, 5, resets=False)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta)]
    o = lasp.gated_delta_attention(*leaves, cu_seqlens=cu)
    got = torch.autograd.grad(o, leaves, do)
    parts, grads = [], [[] for _ in leaves]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ls = [t.detach().narrow(2, a, b - a).clone().requires_grad_() for t in (q, k, v, g, beta)]
        od = lasp.gated_delta_attention(*ls)
        parts.append(od.detach())
        for i, gr in enumerate(torch.autograd.grad(od, ls, do.narrow(2, a, b - a))):
            grads[i].append(gr)
    torch.testing.assert_close(o.detach(), torch.cat(parts, 2), rtol=1e-10, atol=1e-10)
    for i, name in enumerate(["dq", "dk", "dv", "dg", "dbeta"]):
        want = torch.cat(grads[i], 2)
        if name == "dg":  # the given g at a document start has no effect
            starts = cu[:-1]
            want[:, :, starts] = 0
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
def test_packed_outputs_keep_the_input_layout(lasp, l2, seed):
    """Packed documents (segments joined in python) also give o and the gradients in the inputs' memory order:
    contiguous for (B, N, H, .) tensors with layout bnhd, equal to the bhnd call."""
    lens = [5, 1, 70, 30]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta, _, do, _ = _inputs(seed, 1, 1, 1, 3, sum(lens), 6, 5, resets=False)
    t = _to_bnhd
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]
    o = lasp.gated_delta_attention(*leaves, cu_seqlens=cu, use_qk_l2norm=l2)
    want = [o.detach()] + list(torch.autograd.grad(o, leaves, do))
    leaves = [t(x).requires_grad_() for x in (q, k, v, g, beta)]
    o = lasp.gated_delta_attention(*leaves, cu_seqlens=cu, use_qk_l2norm=l2, layout="bnhd")
    got = [o.detach()] + list(torch.autograd.grad(o, leaves, t(do)))
    for name, x, w in zip(("o", "dq", "dk", "dv", "dg", "dbeta"), got, want):
        assert x.is_contiguous(), f"{name}: strides {x.stride()} for layout bnhd, want contiguous"
        torch.testing.assert_close(x, t(w), rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def _packed_vs_each_alone(lasp, fn, q, k, v, g, beta, s0, do, dS, cu, tol, **kw):
    """The packed call with per-document states (s0 (num_docs, H, D, E) or None, cotangents do and dS) against
    ``fn`` on each document alone from its own initial state: outputs, final states and every gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta)] + (
        [s0.detach().clone().requires_grad_()] if s0 is not None else [])
    o, f = lasp.gated_delta_attention(*leaves[:5], cu_seqlens=cu, initial_state=leaves[5] if s0 is not None else None,
                                      output_final_state=True, **kw)
    got = torch.autograd.grad([o, f], leaves, [do, dS])
    outs, fins, grads = [], [], [[] for _ in leaves]
    for j, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ls = [t.detach().narrow(2, a, b - a).clone().requires_grad_() for t in (q, k, v, g, beta)] + (
            [s0[j:j + 1].detach().clone().requires_grad_()] if s0 is not None else [])
        od, fd = fn(*ls[:5], initial_state=ls[5] if s0 is not None else None, **kw)
        outs.append(od.detach())
        fins.append(fd.detach())
        for i, gr in enumerate(torch.autograd.grad([od, fd], ls, [do.narrow(2, a, b - a), dS[j:j + 1]])):
            grads[i].append(gr)
    torch.testing.assert_close(o.detach(), torch.cat(outs, 2), rtol=tol, atol=tol)
    torch.testing.assert_close(f.detach(), torch.cat(fins, 0), rtol=tol, atol=tol)
    for i, name in enumerate(["dq", "dk", "dv", "dg", "dbeta", "dinitial"][:len(leaves)]):
        want = torch.cat(grads[i], 0 if name == "dinitial" else 2)
        torch.testing.assert_close(got[i], want, rtol=tol, atol=tol, msg=lambda m: f"{name} {kw}: {m}")


def test_packed_documents_with_states_match_each_alone(lasp, seed):
    """cu_seqlens with per-document initial states (num_docs, H, D, E) and final states: each document is
    the op on it alone from its own initial state; outputs, final states and every gradient (the initial
    states' rows included) match, GVA heads."""
    lens = [5, 1, 70, 1, 130]
    N, nd = sum(lens), len(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta, _, do, _ = _inputs(seed, 1, 1, 1, 2, N, 6, 5, resets=False)
    s0 = randn((nd, 2, 6, 5), gen(seed + 1), F64)
    dS = randn((nd, 2, 6, 5), gen(seed + 2), F64)
    for l2 in (False, True):
        _packed_vs_each_alone(lasp, _ours(lasp), q, k, v, g, beta, s0, do, dS, cu, 1e-10, use_qk_l2norm=l2)
    # final states alone (no initial ones): zeros in, the same final states as each document alone from zeros
    o2, f2 = lasp.gated_delta_attention(q, k, v, g, beta, cu_seqlens=cu, output_final_state=True)
    o3 = lasp.gated_delta_attention(q, k, v, g, beta, cu_seqlens=cu)
    torch.testing.assert_close(o2, o3, rtol=1e-10, atol=1e-10)
    for j, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        _, fd = lasp.gated_delta_attention(*(t.narrow(2, a, b - a) for t in (q, k, v, g, beta)), output_final_state=True)
        torch.testing.assert_close(f2[j:j + 1], fd, rtol=1e-10, atol=1e-10)


def test_packed_l2norm_keeps_output_and_norms(lasp, seed):
    """With per-document states (the Python composition over segments), use_qk_l2norm keeps for the backward the
    normalised q and k (which the pieces keep anyway) and each row's 1 / norm, not q and k themselves: the bytes
    that autograd saves (each storage once) grow by the rows' norms alone against the same call without it."""
    lens = [40, 1, 87]
    N, H, D, E = sum(lens), 2, 16, 8
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta, _, _, _ = _inputs(seed, 1, H, H, H, N, D, E, dtype=torch.float32, resets=False)

    def saved_bytes(l2):
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            return t

        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta)]
        made = [x * 1.0 for x in leaves[:2]] + leaves[2:]  # q and k made by an earlier operation
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lasp.gated_delta_attention(*made, cu_seqlens=cu, output_final_state=True, use_qk_l2norm=l2)
        return sum(seen.values())

    grown = saved_bytes(True) - saved_bytes(False)
    norms = 2 * 1 * H * N * 4  # one fp32 per row of q and of k
    assert grown == norms, f"use_qk_l2norm made autograd keep {grown} more bytes, not the rows' norms' {norms}"


def test_meta_tensors_give_shapes(lasp):
    """On meta tensors (shape inference, as torch.compile's fake tensors need): the output and final-state
    shapes of both layouts, GVA heads, without value checks."""
    mk = lambda *s: torch.empty(*s, device="meta", dtype=torch.float32)  # noqa: E731
    q, k, v, g, beta = mk(1, 2, 70, 16), mk(1, 2, 70, 16), mk(1, 4, 70, 8), mk(1, 4, 70), mk(1, 4, 70)
    o, f = lasp.gated_delta_attention(q, k, v, g, beta, output_final_state=True, use_qk_l2norm=True)
    assert o.device.type == "meta" and o.shape == (1, 4, 70, 8) and f.shape == (1, 4, 16, 8)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    o = lasp.gated_delta_attention(t(q), t(k), t(v), t(g), t(beta), layout="bnhd")
    assert o.shape == (1, 70, 4, 8)


def test_torch_compile_matches_eager(lasp, seed):
    """torch.compile(fullgraph=True) on one device: outputs and every gradient equal the eager call (the op
    and its C++ autograd function are one node of the graph; the op checks g's values itself)."""
    torch._dynamo.reset()
    ins = _inputs(seed, 1, 1, 1, 2, 150, 16, 8)
    want = _run(_ours(lasp, use_qk_l2norm=True), *ins)
    fn = torch.compile(lasp.gated_delta_attention, fullgraph=True)
    got = _run(lambda *a, **kw: fn(*a, output_final_state=True, use_qk_l2norm=True, **kw), *ins)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_torch_compile_with_l2norm(lasp, seed):
    """On CUDA with 16-bit inputs and use_qk_l2norm, torch.compile(fullgraph=True) traces the op (the l2
    normalisation as ATen operations while tracing: its kernels do not read fake tensors) and runs it: outputs
    and every gradient match the eager call, which takes the kernels, to the inputs' rounding."""
    torch._dynamo.reset()
    ins = _inputs(seed, 1, 2, 2, 2, 150, 64, 64, dtype=torch.bfloat16, device="cuda")
    want = _run(_ours(lasp, use_qk_l2norm=True), *ins)
    fn = torch.compile(lasp.gated_delta_attention, fullgraph=True)
    got = _run(lambda *a, **kw: fn(*a, output_final_state=True, use_qk_l2norm=True, **kw), *ins)
    for name, w in want.items():
        err = rel_err(got[name], w)
        assert err < 1e-2, f"{name}: compiled vs eager, relative error {err:.2e}"


OPCHECK = [
    # B, Hq, Hk, Hv, N, D, E, dtype, with initial state, tokens outer (the tensors in (B, N, H, .) memory)
    pytest.param(1, 2, 1, 2, 70, 5, 3, F64, True, False, id="gqa-f64-state"),
    pytest.param(2, 1, 1, 3, 9, 4, 6, torch.float32, False, False, id="gva-f32"),
    pytest.param(1, 2, 2, 2, 65, 8, 8, torch.bfloat16, True, False, id="bf16-state"),
    pytest.param(1, 2, 1, 2, 70, 64, 64, torch.bfloat16, False, False, id="bf16-minv"),  # gated_delta_fwd returns m^-1
    pytest.param(1, 2, 2, 2, 0, 4, 4, torch.float32, True, False, id="empty-piece"),
    pytest.param(1, 2, 1, 2, 70, 5, 3, F64, True, True, id="gqa-f64-state-tokens-outer"),
    pytest.param(2, 1, 1, 3, 9, 4, 6, torch.float32, False, True, id="gva-f32-tokens-outer"),
]


@pytest.mark.parametrize("B,Hq,Hk,Hv,N,D,E,dtype,with_state,outer", OPCHECK)
def test_opcheck_delta_ops(lasp, B, Hq, Hk, Hv, N, D, E, dtype, with_state, outer, seed):
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch) on the user-facing op
    with inputs that require grad, and on the internal fwd / bwd / map ops (no autograd of their own); with
    tensors in (B, N, H, .) memory the fake tensors must give the outputs' strides too."""
    from torch.library import opcheck

    q, k, v, g, beta, s0, do, dS = _inputs(seed, B, Hq, Hk, Hv, N, D, E, dtype=dtype, resets=N > 2)
    if outer:
        q, k, v, g, beta, do = (_tokens_outer(x) for x in (q, k, v, g, beta, do))
    s0 = s0.to(torch.float64 if dtype == F64 else torch.float32) if with_state else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta)]
    sl = s0.detach().clone().requires_grad_() if with_state else None
    for l2 in (False, True):
        opcheck(torch.ops.lasp.gated_delta_attention.default, (*leaves, 0.5, sl, l2))
    ops = torch.ops.lasp
    opcheck(ops.gated_delta_fwd.default, (q, k, v, g, beta, 0.5, s0))
    opcheck(ops.gated_delta_map.default, (q, k, v, g, beta))
    for only in (False, True):
        opcheck(ops.gated_delta_bwd.default, (q, k, v, g, beta, 0.5, s0, do.to(dtype), dS.float(), only))
    opcheck(ops.gated_delta_bwd.default, (q, k, v, g, beta, 0.5, None, None, None, False))
    minv = ops.gated_delta_fwd(q, k, v, g, beta, 0.5, s0)[2]
    opcheck(ops.gated_delta_bwd.default, (q, k, v, g, beta, 0.5, s0, do.to(dtype), dS.float(), False, minv))


def test_piece_map_and_state_gradient(lasp, seed):
    """The exchange's two quantities: gated_delta_map's (T, L) gives the piece's final state from any incoming
    state, S_out = T S_in + L; gated_delta_bwd's state_grad_only output is the full backward's gradient of the
    incoming state."""
    q, k, v, g, beta, s0, do, dS = _inputs(seed, 2, 2, 1, 2, 150, 6, 5)
    ops = torch.ops.lasp
    T, L = ops.gated_delta_map(q, k, v, g, beta)
    _, fin, minv = ops.gated_delta_fwd(q, k, v, g, beta, 0.3, s0)
    assert minv.numel() == 0, "float64 inputs: no m^-1 (the 16-bit kernels do not take them)"
    torch.testing.assert_close(T @ s0 + L, fin, rtol=1e-12, atol=1e-12)
    full = ops.gated_delta_bwd(q, k, v, g, beta, 0.3, s0, do, dS, False)
    only = ops.gated_delta_bwd(q, k, v, g, beta, 0.3, s0, do, dS, True)
    torch.testing.assert_close(only[5], full[5], rtol=0, atol=0)
    assert all(t.numel() == 0 for t in only[:5])
    # with dout = 0 the state gradient is T^T grad_final_state
    zero = ops.gated_delta_bwd(q, k, v, g, beta, 0.3, s0, None, dS, True)[5]
    torch.testing.assert_close(zero, T.transpose(-1, -2) @ dS, rtol=1e-12, atol=1e-12)


def test_bwd_minv_argument(lasp, seed):
    """gated_delta_bwd's minv (gated_delta_fwd's third output): for inputs the 16-bit kernels do not take (here
    float64) the forward gives a tensor with no elements, which the backward takes as None; for 16-bit inputs with
    D and E in {64, 128} it is each chunk's m^-1 on every device (on the CPU by ATen operations), against float64
    within 16-bit rounding; a wrong one is an error naming minv."""
    q, k, v, g, beta, s0, do, dS = _inputs(seed, 1, 2, 2, 2, 70, 8, 6)
    ops = torch.ops.lasp
    o, fin, minv = ops.gated_delta_fwd(q, k, v, g, beta, 0.3, s0)
    assert minv.shape == (0,) and minv.dtype == q.dtype
    ref = ops.gated_delta_bwd(q, k, v, g, beta, 0.3, s0, do, dS, False)
    got = ops.gated_delta_bwd(q, k, v, g, beta, 0.3, s0, do, dS, False, minv)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="minv"):
        ops.gated_delta_bwd(q, k, v, g, beta, 0.3, s0, do, dS, False, torch.zeros(1, 2, 70, 64, dtype=q.dtype))
    # 16-bit, D = E = 64, a partial second chunk
    q, k, v, g, beta, s0, do, dS = _inputs(seed, 1, 2, 1, 2, 100, 64, 64, dtype=torch.bfloat16)
    o, fin, minv = ops.gated_delta_fwd(q, k, v, g, beta, 0.3, s0)
    assert minv.shape == (1, 2, 100, 64) and minv.dtype == torch.bfloat16
    want = _minv_ref(k, g, beta, 2)
    err = (minv.double() - want).abs().max().item() / want.abs().max().item()
    assert err < 1e-2, f"m^-1: largest error {err:.2e} of its largest entry"
    with pytest.raises(TypeError, match="minv must have q's dtype"):
        ops.gated_delta_bwd(q, k, v, g, beta, 0.3, s0, do.bfloat16(), dS.float(), False, minv.half())


def test_bad_inputs_name_the_argument(lasp):
    q = torch.randn(1, 2, 10, 4)
    g, beta = -torch.rand(1, 2, 10), torch.rand(1, 2, 10)
    with pytest.raises(ValueError, match="g must have shape"):
        lasp.gated_delta_attention(q, q, q, g[:, :1], beta)
    with pytest.raises(ValueError, match="beta must have shape"):
        lasp.gated_delta_attention(q, q, q, g, beta[..., :5])
    with pytest.raises(ValueError, match="g must be <= 0"):
        lasp.gated_delta_attention(q, q, q, -g, beta)
    with pytest.raises(ValueError, match="k heads .3. must divide"):
        lasp.gated_delta_attention(q, torch.randn(1, 3, 10, 4), q, g, beta)
    with pytest.raises(ValueError, match="layout must be"):
        lasp.gated_delta_attention(q, q, q, g, beta, layout="nbhd")
    with pytest.raises(ValueError, match="initial_state must have shape"):
        lasp.gated_delta_attention(q, q, q, g, beta, initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="cu_seqlens needs one packed row"):
        q2 = torch.randn(2, 2, 10, 4)
        lasp.gated_delta_attention(q2, q2, q2, -torch.rand(2, 2, 10), torch.rand(2, 2, 10),
                                   cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"with cu_seqlens, initial_state must have shape \(num_docs, H, D, E\) = "
                                         r"\(2, 2, 4, 4\)"):
        lasp.gated_delta_attention(q, q, q, g, beta, cu_seqlens=torch.tensor([0, 4, 10]),
                                   initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match="beta must be a floating-point tensor"):
        lasp.gated_delta_attention(q, q, q, g, torch.ones(1, 2, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^lasp.gated_delta_attention: scale must be a real number or None, got 'a'"):
        lasp.gated_delta_attention(q, q, q, g, beta, scale="a")
    with pytest.raises(ValueError, match=r"^lasp.gated_delta_attention: q must have a head dim of at least 1"):
        lasp.gated_delta_attention(q[..., :0], q[..., :0], q, g, beta)
    with pytest.raises(ValueError, match=r"^lasp.gated_delta_attention: v must have a head dim of at least 1"):
        lasp.gated_delta_attention(q, q, q[..., :0], g, beta)


CUDA_SHAPES = [
    # (B, Hq, Hk, Hv, N, D, E)
    (2, 2, 1, 2, 300, 64, 64),    # GQA, a partial last chunk
    (1, 1, 1, 4, 200, 128, 64),   # GVA, D = 128
    (1, 2, 2, 2, 130, 256, 33),   # D = 256, an odd E over two column tiles of the chain
    (1, 2, 2, 2, 65, 7, 100),     # odd D
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernels", ["aten", "cuda", "fused"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=[f"q{s[1]}k{s[2]}v{s[3]}-N{s[4]}-D{s[5]}E{s[6]}" for s in CUDA_SHAPES])
def test_cuda_matches_recurrence(lasp, shape, dtype, kernels, seed, monkeypatch):
    """On the GPU, every input's gradient and the outputs against the float64 recurrence, with the chain of
    states and the chunks' solves as ATen operations or as CUDA kernels, and with the fused WY kernel
    (LASP_DELTA_KERNELS)."""
    monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
    ins = _inputs(seed, *shape, dtype=dtype, device="cuda")
    got = _run(_ours(lasp), *ins)
    want = _run(_ref(), *(t.double().cpu() for t in ins))
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for key, w in want.items():
        err = ((got[key].double().cpu() - w).norm() / w.norm()).item()
        assert err < tol, f"{key}: relative error {err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernels_equal_aten(lasp, seed, monkeypatch):
    """The CUDA kernels (chain, solves, the fused WY kernel) give the ATen compositions' results (float64: to
    rounding) in the three ops that use them: forward, backward (all gradients, the transposed solve), the
    piece's map."""
    ops = torch.ops.lasp
    q, k, v, g, beta, s0, do, dS = _inputs(seed, 1, 2, 1, 2, 333, 40, 24, dtype=F64, device="cuda", resets=True)
    res = {}
    for kernels in ("aten", "cuda", "fused"):
        monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
        res[kernels] = [*ops.gated_delta_fwd(q, k, v, g, beta, 0.4, s0)[:2],
                      *ops.gated_delta_bwd(q, k, v, g, beta, 0.4, s0, do, dS, False),
                      *ops.gated_delta_map(q, k, v, g, beta)]
    for kernels in ("cuda", "fused"):
        for i, (a, b) in enumerate(zip(res["aten"], res[kernels])):
            torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11, msg=lambda m: f"{kernels}, output {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=[f"q{s[1]}k{s[2]}v{s[3]}-N{s[4]}-D{s[5]}E{s[6]}" for s in CUDA_SHAPES])
def test_host_block_programs_match_recurrence(lasp, shape, dtype, seed, monkeypatch):
    """LASP_DELTA_KERNELS=host on CPU tensors: the whole op through the CUDA kernels' block programs run on the
    host (the chain, the solves, the WY, output, chain-input, transposed-solve and gradient programs, wired as
    on the GPU), every output and gradient against the float64 recurrence as tightly as the ATen path (bf16
    inputs: the output's tensor-core form, its tf32 products emulated)."""
    ins = _inputs(seed, *shape, dtype=dtype)
    want = _run(_ref(), *(t.double() for t in ins))
    res = {}
    for kernels in ("aten", "host"):
        monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
        res[kernels] = _run(_ours(lasp), *ins)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for key, w in want.items():
        err = ((res["host"][key].double() - w).norm() / w.norm()).item()
        assert err < tol, f"{key}: relative error {err:.2e}"
    # the programs computed it (another order of operations than the compositions'), not a fallback (bf16
    # results can round to the same values)
    assert not torch.equal(res["host"]["o"], res["aten"]["o"])
    if dtype != torch.bfloat16:
        assert not torch.equal(res["host"]["dq"], res["aten"]["dq"])


def test_host_block_programs_in_the_map_op(lasp, seed, monkeypatch):
    """The piece's map (T, L) through the host programs equals the compositions' to rounding."""
    ops = torch.ops.lasp
    q, k, v, g, beta = _inputs(seed, 1, 2, 1, 2, 200, 24, 16)[:5]
    res = {}
    for kernels in ("aten", "host"):
        monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
        res[kernels] = ops.gated_delta_map(q, k, v, g, beta)
    for a, b in zip(res["aten"], res["host"]):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)
    assert not torch.equal(res["aten"][1], res["host"][1])


def test_bad_kernels_setting(lasp, seed, monkeypatch):
    """An unknown LASP_DELTA_KERNELS value is an error that names the setting and the values it takes."""
    ins = _inputs(seed, 1, 1, 1, 1, 70, 8, 8, dtype=torch.float32)
    monkeypatch.setenv("LASP_DELTA_KERNELS", "triton")
    with pytest.raises(ValueError, match="LASP_DELTA_KERNELS must be 'aten', 'cuda', 'fused' or 'host', got 'triton'"):
        lasp.gated_delta_attention(*ins[:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bad_kernels_setting(lasp, seed, monkeypatch):
    """An unknown LASP_DELTA_KERNELS value is an error that names the setting and the values it takes."""
    ins = _inputs(seed, 1, 1, 1, 1, 70, 8, 8, dtype=torch.float32, device="cuda")
    monkeypatch.setenv("LASP_DELTA_KERNELS", "triton")
    with pytest.raises(ValueError, match="LASP_DELTA_KERNELS must be 'aten', 'cuda', 'fused' or 'host', got 'triton'"):
        lasp.gated_delta_attention(*ins[:5])


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


WGMMA_SHAPES = [
    # (B, Hq, Hk, Hv, N, D, E): 16-bit inputs with D and E in {64, 128}
    (2, 2, 2, 2, 1000, 128, 128),  # 16 chunks, a partial last one
    (1, 4, 2, 4, 333, 64, 64),     # GQA
    (1, 1, 1, 4, 200, 128, 64),    # GVA
    (1, 2, 2, 2, 64, 64, 128),     # one whole chunk, two column tiles of E
    (1, 2, 2, 2, 1, 128, 64),      # one token
]


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 (Hopper) CUDA device")
@pytest.mark.parametrize("resets", [False, True], ids=["gates", "resets"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", WGMMA_SHAPES,
                         ids=[f"B{s[0]}q{s[1]}k{s[2]}v{s[3]}-N{s[4]}-D{s[5]}E{s[6]}" for s in WGMMA_SHAPES])
def test_cuda_wgmma_main_pass_matches_recurrence(lasp, shape, dtype, resets, seed, monkeypatch):
    """On sm_90a, 16-bit inputs with D and E in {64, 128}: the forward's chain of states and its output are
    one wgmma kernel (kernels/wgmma_fwd.cu with U = W_v - W_k S_b; W and the chunk states in 16 bits). That
    kernel is the one that runs (under LASP_DELTA_KERNELS=cuda and =fused, not under =aten), and o and the
    final state from an initial state match the float64 recurrence within the op's bf16 / fp16 bound."""
    q, k, v, g, beta, s0, do, dS = _inputs(seed, *shape, dtype=dtype, device="cuda", resets=resets)
    D = shape[5]
    want_o, want_f = lasp_ref.gated_delta_recurrent(*(t.double().cpu() for t in (q, k, v, g, beta)), scale=D ** -0.5,
                                                    initial_state=s0.double().cpu())
    for kernels in ("cuda", "fused", "aten"):
        monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            o, f, _ = torch.ops.lasp.gated_delta_fwd(q, k, v, g, beta, D ** -0.5, s0)
            torch.cuda.synchronize()
        ran = any("wgmma_fwd_kernel" in e.name for e in prof.events())
        assert ran == (kernels != "aten"), f"{kernels}: the wgmma main pass ran: {ran}"
        for name, got, want in (("o", o, want_o), ("final", f, want_f)):
            err = rel_err(got, want)
            assert err < 3e-2, f"{kernels}, {name}: relative error {err:.2e}"


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 (Hopper) CUDA device")
@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 2, 200, 128, 128), (1, 1, 1, 4, 130, 128, 64), (2, 4, 2, 4, 100, 64, 64)],
                         ids=["mha", "gva", "gqa"])
def test_cuda_outputs_keep_the_input_layout(lasp, shape, l2, seed):
    """The 16-bit kernels write o and the gradients of the inputs with a head per output head straight into the
    inputs' memory order: for layout bnhd (fla's (B, N, H, .) tensors) o, dq, dk, dv, dg, dbeta come back
    contiguous in that layout, and equal to the bhnd call's (same kernels, same order of operations)."""
    q, k, v, g, beta, s0, do, dS = _inputs(seed, *shape, dtype=torch.bfloat16, device="cuda")
    s0, dS = s0.float(), dS.float()
    want = _run(_ours(lasp, use_qk_l2norm=l2), q, k, v, g, beta, s0, do, dS)
    t = _to_bnhd
    got = _run(_ours(lasp, use_qk_l2norm=l2, layout="bnhd"), t(q), t(k), t(v), t(g), t(beta), s0, t(do), dS)
    for key in ("o", "dq", "dk", "dv", "dg", "dbeta"):
        assert got[key].is_contiguous(), f"{key}: strides {got[key].stride()} for layout bnhd, want contiguous"
        assert want[key].is_contiguous(), f"{key}: strides {want[key].stride()} for layout bhnd, want contiguous"
        torch.testing.assert_close(got[key], t(want[key]), rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    for key in ("f", "ds0"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 (Hopper) CUDA device")
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_cuda_wgmma_main_pass_with_l2norm(lasp, layout, seed):
    """The user-facing op with use_qk_l2norm (q and k normalised in the op, kept in their 16-bit dtype) and
    either layout takes the sm_90a forward and the 16-bit backward too (the l2 normalisation's backward one
    kernel), and its output, final state and gradients match the float64 recurrence."""
    B, H, N, D = 2, 4, 300, 128
    q, k, v, g, beta, s0, do, dS = _inputs(seed, B, H, H, H, N, D, D, dtype=torch.bfloat16, device="cuda")
    t = (lambda x: x.transpose(1, 2).contiguous()) if layout == "bnhd" else (lambda x: x)
    fn = lambda *a, **kw: lasp.gated_delta_attention(*(t(x) for x in a), output_final_state=True,  # noqa: E731
                                                     use_qk_l2norm=True, layout=layout, **kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(q, k, v, g, beta)
        torch.cuda.synchronize()
    assert any("wgmma_fwd_kernel" in e.name for e in prof.events()), "the sm_90a forward did not run"
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, s0)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o, f = fn(*leaves[:5], initial_state=leaves[5])
        got = dict(zip(["o", "f", "dq", "dk", "dv", "dg", "dbeta", "ds0"],
                       [t(o.detach()), f.detach(),
                        *torch.autograd.grad([o, f], leaves, [t(do.to(o.dtype)), dS.float()])]))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("grad16_kernel" in n for n in names), "the 16-bit backward did not run"
    assert any("l2norm16_kernel" in n and "true>" in n for n in names), "the l2 normalisation's backward kernel did not run"
    want = _run(_ref(use_qk_l2norm=True), *(x.double().cpu() for x in (q, k, v, g, beta, s0, do, dS)))
    for key, w in want.items():
        err = rel_err(got[key], w)
        assert err < 3e-2, f"{key}: relative error {err:.2e}"


def _l2norm_paths(lasp, dtype, seed, device, D, layout):
    """(o, final) of use_qk_l2norm without autograd recording, the same with q and k requiring grad, and the
    float64 recurrence's, for one input set."""
    B, H, N = 1, 2, 100
    q, k, v, g, beta, s0, do, dS = _inputs(seed, B, H, H, H, N, D, D, dtype=dtype, device=device)
    q[:, :, 5] = 0  # a zero row: 0 / sqrt(1e-6)
    t = (lambda x: x.transpose(1, 2).contiguous()) if layout == "bnhd" else (lambda x: x)
    kw = dict(initial_state=s0, use_qk_l2norm=True, output_final_state=True, layout=layout)
    with torch.no_grad():
        o1, f1 = lasp.gated_delta_attention(*(t(x) for x in (q, k, v, g, beta)), **kw)
    leaves = [t(x).requires_grad_() for x in (q, k)]
    o2, f2 = lasp.gated_delta_attention(*leaves, *(t(x) for x in (v, g, beta)), **kw)
    want = _run(_ref(use_qk_l2norm=True), *(x.double().cpu() for x in (q, k, v, g, beta, s0, do, dS)))
    back = (lambda x: x.transpose(1, 2)) if layout == "bnhd" else (lambda x: x)
    return (back(o1), f1), (back(o2.detach()), f2.detach()), (want["o"], want["f"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_l2norm_without_grad_matches_recorded(lasp, dtype, seed):
    """use_qk_l2norm normalises q and k in two passes where autograd does not record the op (no grad, or
    inputs without requires_grad) and with differentiable ATen operations where it does: both give the same
    output (to the dtype's rounding), rows of zeros included, and match the float64 recurrence."""
    nograd, recorded, want = _l2norm_paths(lasp, dtype, seed, "cpu", 32, "bhnd")
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    tol64 = {torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    for name, a, b, w in zip(("o", "final"), nograd, recorded, want):
        err = rel_err(a, b)
        assert err < tol, f"{name}: no grad vs recorded, relative error {err:.2e}"
        err = rel_err(a, w)
        assert err < tol64, f"{name}: relative error {err:.2e} against float64"


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 (Hopper) CUDA device")
@pytest.mark.parametrize("resets", [False, True], ids=["gates", "resets"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", WGMMA_SHAPES,
                         ids=[f"B{s[0]}q{s[1]}k{s[2]}v{s[3]}-N{s[4]}-D{s[5]}E{s[6]}" for s in WGMMA_SHAPES])
def test_cuda_bwd16_matches_recurrence(lasp, shape, dtype, resets, seed, monkeypatch):
    """16-bit inputs with D and E in {64, 128}: the backward is the WY kernel, the two chains of states and the
    per-chunk gradients in 16 bits (kernels/delta_chain16.h, delta_grad16.h), under LASP_DELTA_KERNELS=cuda and
    =fused, not =aten; every input's gradient (the initial state's, and with the final state's cotangent)
    matches the float64 recurrence within the op's bf16 / fp16 bound."""
    ins = _inputs(seed, *shape, dtype=dtype, device="cuda", resets=resets)
    want = _run(_ref(), *(t.double().cpu() for t in ins))
    for kernels in ("cuda", "fused", "aten"):
        monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = _run(_ours(lasp), *ins)
            torch.cuda.synchronize()
        ran = any("grad16_kernel" in e.name for e in prof.events())
        assert ran == (kernels != "aten"), f"{kernels}: the 16-bit backward ran: {ran}"
        for key, w in want.items():
            err = rel_err(got[key], w)
            assert err < 3e-2, f"{kernels}, {key}: relative error {err:.2e}"


def _minv_ref(k, g, beta, H):
    """Each chunk's m^-1 (m = I + A, A[i, j] = beta[i] exp(g[j+1] + .. + g[i]) k[i] . k[j], j < i) in float64, as
    (B, H, N, 64): row n holds row n mod 64 of its chunk's."""
    k, g, beta = (t.double().cpu() for t in (k, g, beta))
    k = k.repeat_interleave(H // k.shape[1], 1)
    B, _, N, _ = k.shape
    out = torch.zeros(B, H, N, 64, dtype=torch.float64)
    for n0 in range(0, N, 64):
        R = min(64, N - n0)
        kc, gc, bc = k[:, :, n0:n0 + R], g[:, :, n0:n0 + R], beta[:, :, n0:n0 + R]
        gam = torch.zeros(B, H, R, R, dtype=torch.float64)  # each entry the exp of its own range's sum (-inf: 0)
        for i in range(R):
            for j in range(i):
                gam[..., i, j] = torch.exp(gc[..., j + 1:i + 1].sum(-1))
        A = (bc.unsqueeze(-1) * gam * (kc @ kc.transpose(-1, -2))).tril(-1)
        eye = torch.eye(R, dtype=torch.float64)
        out[:, :, n0:n0 + R, :R] = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False)
    return out


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 (Hopper) CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 2, 150, 128, 64), (1, 1, 1, 2, 64, 64, 128)],
                         ids=["GQA-N150-D128E64", "GVA-N64-D64E128"])
def test_cuda_forward_keeps_minv(lasp, shape, dtype, seed, monkeypatch):
    """Where the 16-bit backward runs, gated_delta_fwd's third output is each chunk's m^-1 in the inputs' dtype
    (B, H, N, 64) (against float64, within its rounding); the backward reading it gives what it gives forming
    m^-1 again; opcheck passes with it; a wrong one is an error naming minv. Under LASP_DELTA_KERNELS=aten the
    forward forms it by ATen operations, to the same values within their rounding."""
    from torch.library import opcheck

    ops = torch.ops.lasp
    q, k, v, g, beta, s0, do, dS = _inputs(seed, *shape, dtype=dtype, device="cuda")
    q, k = (torch.nn.functional.normalize(x.float(), dim=-1).to(dtype) for x in (q, k))
    B, H, N = g.shape
    scale = shape[5] ** -0.5
    o, fin, minv = ops.gated_delta_fwd(q, k, v, g, beta, scale, s0)
    assert minv.shape == (B, H, N, 64) and minv.dtype == dtype
    want = _minv_ref(k, g, beta, H)
    err = (minv.double().cpu() - want).abs().max().item() / want.abs().max().item()
    assert err < 1e-2, f"m^-1: largest error {err:.2e} of its largest entry"
    without = ops.gated_delta_bwd(q, k, v, g, beta, scale, s0, do.to(dtype), dS.float(), False)
    with_minv = ops.gated_delta_bwd(q, k, v, g, beta, scale, s0, do.to(dtype), dS.float(), False, minv)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "ds0"), without, with_minv):
        err = rel_err(b, a)
        assert err < 2e-3, f"{name}: with the forward's m^-1 vs formed again, relative difference {err:.2e}"
    opcheck(ops.gated_delta_fwd.default, (q, k, v, g, beta, scale, s0))
    opcheck(ops.gated_delta_bwd.default, (q, k, v, g, beta, scale, s0, do.to(dtype), dS.float(), False, minv))
    with pytest.raises(ValueError, match="minv must have shape"):
        ops.gated_delta_bwd(q, k, v, g, beta, scale, s0, do.to(dtype), dS.float(), False, minv[:, :, :-1])
    with pytest.raises(TypeError, match="minv must have q's dtype"):
        ops.gated_delta_bwd(q, k, v, g, beta, scale, s0, do.to(dtype), dS.float(), False, minv.float())
    monkeypatch.setenv("LASP_DELTA_KERNELS", "aten")
    aten = ops.gated_delta_fwd(q, k, v, g, beta, scale, s0)[2]
    assert aten.shape == minv.shape
    err = (aten.double() - minv.double()).abs().max().item() / want.abs().max().item()
    assert err < 1e-2, f"m^-1 by ATen operations vs the kernel's: largest difference {err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("D", [32, 128, 48])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_l2norm_backward_kernel(lasp, dtype, D, layout, seed):
    """Where autograd records use_qk_l2norm on CUDA, the normalisation is an autograd function whose backward
    is one kernel for 16-bit rows of a power-of-two D (delta_l2norm16_bwd; the profiler must see it, and must
    not for D = 48, which takes the ATen formula): the gradients of q and k (a zero row included) match the
    float64 recurrence's in either layout."""
    B, H, N = 1, 2, 100
    q, k, v, g, beta, s0, do, dS = _inputs(seed, B, H, H, H, N, D, D, dtype=dtype, device="cuda")
    q[:, :, 5] = 0
    t = (lambda x: x.transpose(1, 2).contiguous()) if layout == "bnhd" else (lambda x: x)
    back = (lambda x: x.transpose(1, 2)) if layout == "bnhd" else (lambda x: x)
    leaves = [t(x).requires_grad_() for x in (q, k)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o, f = lasp.gated_delta_attention(*leaves, *(t(x) for x in (v, g, beta)), initial_state=s0,
                                          use_qk_l2norm=True, output_final_state=True, layout=layout)
        dq, dk = torch.autograd.grad([o, f], leaves, [t(do.to(o.dtype)), dS.float()])
        torch.cuda.synchronize()
    ran = any("l2norm16_kernel" in e.name and "true>" in e.name for e in prof.events())
    assert ran == (D != 48), f"the l2 normalisation's backward kernel ran: {ran}"
    want = _run(_ref(use_qk_l2norm=True), *(x.double().cpu() for x in (q, k, v, g, beta, s0, do, dS)))
    for name, got in (("dq", back(dq)), ("dk", back(dk))):
        err = rel_err(got, want[name])
        assert err < 3e-2, f"{name}: relative error {err:.2e} against float64"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_cuda_l2norm_keeps_not_its_input(lasp, layout, seed):
    """With use_qk_l2norm under autograd, the normalisation keeps its output and each row's 1 / norm for the
    backward, not its input: q and k made by an earlier operation (as a projection makes them) are freed once the
    caller drops them, before the backward runs; the gradients still match the float64 recurrence's."""
    B, H, N, D = 1, 4, 1024, 128
    q, k, v, g, beta, s0, do, dS = _inputs(seed, B, H, H, H, N, D, D, dtype=torch.bfloat16, device="cuda")
    t = (lambda x: x.transpose(1, 2).contiguous()) if layout == "bnhd" else (lambda x: x)
    back = (lambda x: x.transpose(1, 2)) if layout == "bnhd" else (lambda x: x)
    leaves = [t(x).requires_grad_() for x in (q, k)]
    qq, kk = (x * 1.0 for x in leaves)  # non-leaf results whose backward keeps nothing of them
    o, f = lasp.gated_delta_attention(qq, kk, *(t(x) for x in (v, g, beta)), initial_state=s0, use_qk_l2norm=True,
                                      output_final_state=True, layout=layout)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    nbytes = qq.numel() * qq.element_size() + kk.numel() * kk.element_size()
    del qq, kk
    freed = before - torch.cuda.memory_allocated()
    assert freed == nbytes, f"dropping q and k freed {freed} bytes, not their {nbytes}: autograd keeps them"
    dq, dk = torch.autograd.grad([o, f], leaves, [t(do.to(o.dtype)), dS.float()])
    want = _run(_ref(use_qk_l2norm=True), *(x.double().cpu() for x in (q, k, v, g, beta, s0, do, dS)))
    for name, got in (("dq", back(dq)), ("dk", back(dk))):
        err = rel_err(got, want[name])
        assert err < 3e-2, f"{name}: relative error {err:.2e} against float64"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("D", [32, 128, 256, 48])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_l2norm_kernel(lasp, dtype, D, layout, seed):
    """Without autograd recording, 16-bit q and k of a power-of-two D up to 256 are normalised by one CUDA
    kernel (delta_l2norm16; the profiler must see it, and must not for D = 48, which takes the ATen passes),
    in either layout: the op's output matches the recorded form's and the float64 recurrence."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        nograd, recorded, want = _l2norm_paths(lasp, dtype, seed, "cuda", D, layout)
        torch.cuda.synchronize()
    ran = any("l2norm16_kernel" in e.name for e in prof.events())
    assert ran == (D != 48), f"the l2norm kernel ran: {ran}"
    for name, a, b, w in zip(("o", "final"), nograd, recorded, want):
        err = rel_err(a, b)
        assert err < 1e-2, f"{name}: no grad vs recorded, relative error {err:.2e}"
        err = rel_err(a, w)
        assert err < 3e-2, f"{name}: relative error {err:.2e} against float64"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("resets", [False, True], ids=["gates", "resets"])
@pytest.mark.parametrize("dims", [(128, 128), (64, 64), (256, 40), (48, 16)], ids=lambda d: f"D{d[0]}E{d[1]}")
def test_cuda_tensor_core_chain_near_aten(lasp, dims, resets, seed, monkeypatch):
    """16-bit inputs take the chain on tensor cores (tf32 products, kernels/delta_chain_tc.cu): forward,
    backward and the piece's map stay within tf32's rounding of the ATen compositions' float32 results, over
    many chunks (with resets, -inf gates, the map's T is exactly 0 in both). Over 1000 tokens these gates sum
    to about -400 per (b, h), so T underflows to 0 in float32 in every implementation; the map is checked
    again with the gates scaled by 0.01 (sums about -4), where T is not 0."""
    ops = torch.ops.lasp
    D, E = dims
    q, k, v, g, beta, s0, do, dS = _inputs(seed, 2, 2, 2, 2, 1000, D, E, dtype=torch.bfloat16, device="cuda",
                                           resets=resets)
    q, k = (torch.nn.functional.normalize(x.float(), dim=-1) for x in (q, k))  # as use_qk_l2norm gives them
    g_mild = (g.float() * 0.01).to(g.dtype)
    res = {}
    for kernels in ("aten", "cuda", "fused"):
        monkeypatch.setenv("LASP_DELTA_KERNELS", kernels)
        res[kernels] = [*ops.gated_delta_fwd(q, k, v, g, beta, D ** -0.5, s0)[:2],
                        *ops.gated_delta_bwd(q, k, v, g, beta, D ** -0.5, s0, do, dS, False),
                        *ops.gated_delta_map(q, k, v, g, beta),
                        *ops.gated_delta_map(q, k, v, g_mild, beta)]
    names = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "ds0", "T", "L", "T (mild gates)", "L (mild gates)"]
    for kernels, name, a, b in [(kk, n, a, b) for kk in ("cuda", "fused")
                                for n, a, b in zip(names, res["aten"], res[kk])]:
        diff, ref = (b.double() - a.double()).norm().item(), a.double().norm().item()
        if ref == 0:
            assert diff == 0, f"{kernels}, {name}: {diff:.2e} where the composition gives exact zeros"
        else:
            assert diff / ref < 5e-3, f"{kernels}, {name}: relative difference {diff / ref:.2e}"
        if name == "T (mild gates)" and not resets:
            assert ref > 0, "the map's T with mild gates and no reset must not be 0"


# ----------------------------------------------------------------------------------------------
# Across ranks (Gloo): each rank's piece against the same slice of the one-rank call

import datetime  # noqa: E402
import os  # noqa: E402

import torch.distributed as dist  # noqa: E402

from conftest import import_lasp, record_errors, spawn_world  # noqa: E402

# (pieces, layout, packed document lengths or None)
DIST = {
    2: [([70, 61], "bhnd", None), ([0, 40], "bnhd", None), ([64, 64], "bhnd", [10, 54, 1, 63])],
    3: [([1, 100, 30], "bnhd", None), ([50, 0, 20], "bhnd", [50, 20])],
    4: [([20, 1, 65, 7], "bhnd", None), ([33, 33, 0, 34], "bnhd", [1, 1, 98])],
}


def _dist_problem(world, ci, N):
    return _inputs(2000 + 10 * world + ci, 1, 2, 1, 2, N, 6, 5, resets=False)


def _doc_states(world, ci, num_docs):
    g_ = gen(3000 + 10 * world + ci)
    return randn((num_docs, 2, 6, 5), g_, F64), randn((num_docs, 2, 6, 5), g_, F64)


def _to_layout(x, layout):
    return x if layout == "bhnd" else x.transpose(1, 2).contiguous()


def _dist_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    lasp = import_lasp()
    results = {}
    for ci, (pieces, layout, docs) in enumerate(DIST[world]):
        N = sum(pieces)
        q, k, v, g, beta, s0, do, dS = _dist_problem(world, ci, N)
        P, n = sum(pieces[:rank]), pieces[rank]
        sl = lambda t: _to_layout(t.narrow(2, P, n), layout)  # noqa: E731
        for strategy in ("ring", "allgather", "scan", "scan/nodes2"):
            # "scan/nodes2": the scan over nodes of 2 consecutive ranks (env LASP_NODE_SIZE)
            if strategy == "scan/nodes2":
                os.environ["LASP_NODE_SIZE"] = "2"
            leaves = [sl(t).clone().requires_grad_() for t in (q, k, v, g.unsqueeze(-1), beta.unsqueeze(-1))]
            leaves[3], leaves[4] = (x.detach().squeeze(-1).clone().requires_grad_() for x in leaves[3:5])
            kw = dict(group=dist.group.WORLD, strategy=strategy.split("/")[0], layout=layout)
            if docs is None:
                st = s0.clone().requires_grad_()
                o, f = lasp.gated_delta_attention(*leaves, initial_state=st, output_final_state=True, **kw)
                outs, cots = [o, f], [sl(do), dS if rank == world - 1 else torch.zeros_like(dS)]
                gr = torch.autograd.grad(outs, leaves + [st], cots)
            else:
                cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist())
                o = lasp.gated_delta_attention(*leaves, cu_seqlens=cu, **kw)
                gr = torch.autograd.grad(o, leaves, sl(do)) + (None,)
                # per-document states: initial (num_docs, H, D, E) and final states
                s0d, dSd = _doc_states(world, ci, len(docs))
                ls = [x.detach().clone().requires_grad_() for x in leaves] + [s0d.clone().requires_grad_()]
                od, fd = lasp.gated_delta_attention(*ls[:5], cu_seqlens=cu, initial_state=ls[5],
                                                    output_final_state=True, **kw)
                grd = torch.autograd.grad([od, fd], ls, [sl(do), dSd])
                results[(ci, strategy, "states")] = dict(o=od.detach(), f=fd.detach(), grads=[x.detach() for x in grd])
            results[(ci, strategy)] = dict(o=o.detach(), grads=[None if x is None else x.detach() for x in gr])
            os.environ.pop("LASP_NODE_SIZE", None)
    q1, g1, b1 = torch.randn(1, 2, 3, 4), -torch.rand(1, 2, 3), torch.rand(1, 2, 3)
    calls = {
        "heads": lambda: lasp.gated_delta_attention(
            q1, q1, q1 if rank else torch.randn(1, 1, 3, 4), g1, b1, group=dist.group.WORLD),
        "local": lambda: lasp.gated_delta_attention(q1, q1, q1, g1 if rank else -g1, b1, group=dist.group.WORLD),
        "states": lambda: lasp.gated_delta_attention(q1, q1, q1, g1, b1, group=dist.group.WORLD,
                                                     cu_seqlens=torch.tensor([0, 3 * world]),
                                                     output_final_state=(rank == world - 1)),
    }
    results["errors"] = record_errors(calls)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_across_ranks_matches_one_rank(lasp, world):
    res = spawn_world(_dist_worker, world, (), 180, f"gated delta rule (gloo, world={world})")
    _check_world(lasp, world, res)


def test_across_ranks_through_host_programs(lasp, monkeypatch):
    """Every strategy across 3 ranks (uneven and empty pieces, packed documents, per-document states) with the
    CUDA kernels' block programs run on the host in every rank (LASP_DELTA_KERNELS=host: the piece's map, the
    state-gradient-only backward and the full backward through them) against one rank's ATen result."""
    monkeypatch.setenv("LASP_DELTA_KERNELS", "host")
    res = spawn_world(_dist_worker, 3, (), 240, "gated delta rule (gloo, world=3, host programs)")
    monkeypatch.delenv("LASP_DELTA_KERNELS")
    _check_world(lasp, 3, res)


def _check_world(lasp, world, res):
    for ci, (pieces, layout, docs) in enumerate(DIST[world]):
        N = sum(pieces)
        q, k, v, g, beta, s0, do, dS = _dist_problem(world, ci, N)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        if docs is None:
            st = s0.clone().requires_grad_()
            o, f = lasp.gated_delta_attention(*leaves, initial_state=st, output_final_state=True)
            want = torch.autograd.grad([o, f], leaves + [st], [do, dS])
        else:
            cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist())
            o = lasp.gated_delta_attention(*leaves, cu_seqlens=cu)
            want = torch.autograd.grad(o, leaves, do)
        for strategy in ("ring", "allgather", "scan", "scan/nodes2"):
            parts = [res[r][(ci, strategy)] for r in range(world)]
            back = lambda x: x if layout == "bhnd" else x.transpose(1, 2)  # noqa: E731
            got_o = torch.cat([back(p["o"]) for p in parts], dim=2)
            torch.testing.assert_close(got_o, o.detach(), rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"case {ci} {strategy} o: {m}")
            for i, nm in enumerate(["dq", "dk", "dv"]):
                got = torch.cat([back(p["grads"][i]) for p in parts], dim=2)
                torch.testing.assert_close(got, want[i], rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"case {ci} {strategy} {nm}: {m}")
            for i, nm in ((3, "dg"), (4, "dbeta")):
                got = torch.cat([p["grads"][i] if layout == "bhnd" else p["grads"][i].transpose(1, 2)
                                 for p in parts], dim=2)
                torch.testing.assert_close(got, want[i], rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"case {ci} {strategy} {nm}: {m}")
            if docs is None:  # the initial state's gradient: rank 0's, the others zero
                torch.testing.assert_close(parts[0]["grads"][5], want[5], rtol=1e-9, atol=1e-9)
                for p in parts[1:]:
                    assert torch.all(p["grads"][5] == 0)
            else:  # per-document states: final states and initial-state gradients summed over the ranks
                s0d, dSd = _doc_states(world, ci, len(docs))
                ls = [t.clone().requires_grad_() for t in (q, k, v, g, beta)] + [s0d.clone().requires_grad_()]
                od, fd = lasp.gated_delta_attention(*ls[:5], cu_seqlens=cu, initial_state=ls[5], output_final_state=True)
                wd = torch.autograd.grad([od, fd], ls, [do, dSd])
                sp = [res[r][(ci, strategy, "states")] for r in range(world)]
                torch.testing.assert_close(torch.cat([back(p["o"]) for p in sp], 2), od.detach(), rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"case {ci} {strategy} states o: {m}")
                torch.testing.assert_close(sum(p["f"] for p in sp), fd.detach(), rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"case {ci} {strategy} final states: {m}")
                for i, nm in enumerate(["dq", "dk", "dv", "dg", "dbeta"]):
                    got = torch.cat([back(p["grads"][i]) if i < 3 or layout == "bhnd" else p["grads"][i].transpose(1, 2)
                                     for p in sp], 2)
                    torch.testing.assert_close(got, wd[i], rtol=1e-9, atol=1e-9,
                                               msg=lambda m: f"case {ci} {strategy} states {nm}: {m}")
                torch.testing.assert_close(sum(p["grads"][5] for p in sp), wd[5], rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"case {ci} {strategy} states dinitial: {m}")
    # the rank whose input is bad says why, every other rank names it
    expect = {"heads": lambda r: ("ValueError", "must call alike"),
              "local": lambda r: ("ValueError", "g must be <= 0" if r == 0 else "not valid on group ranks [0]"),
              "states": lambda r: ("ValueError", "must call alike")}
    for name, want_of in expect.items():
        for r in range(world):
            typ, text = want_of(r)
            e = res[r]["errors"][name]
            assert e is not None and e[0] == typ and text in e[1], (name, r, e)


# ----------------------------------------------------------------------------------------------
# Random shapes over the whole domain: head maps, head dims (odd ones), lengths around the chunk size

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _delta_shapes(draw):
    H = draw(st.sampled_from([1, 2, 4, 6]))
    divisors = [d for d in range(1, H + 1) if H % d == 0]
    Hq = draw(st.sampled_from(divisors))
    Hk = draw(st.sampled_from(divisors))
    Hv = H if Hq < H else draw(st.sampled_from(divisors))
    N = draw(st.sampled_from([1, 2, 63, 64, 65, 127, 130, 200]))
    D = draw(st.integers(1, 24))
    E = draw(st.integers(1, 24))
    B = draw(st.integers(1, 2))
    return B, Hq, Hk, Hv, N, D, E


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=_delta_shapes(), l2=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_match_recurrence(lasp, shape, l2, seed):
    ins = _inputs(seed, *shape)
    got = _run(_ours(lasp, use_qk_l2norm=l2), *ins)
    want = _run(_ref(use_qk_l2norm=l2), *ins)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-8, atol=1e-8, msg=lambda m: f"{shape} {key}: {m}")


@st.composite
def _host_shapes(draw):
    B, Hq, Hk, Hv, N, D, E = draw(_delta_shapes())
    # and wide dims: more than one pass of the programs' 256-column tiles (D + E, D, E past 256)
    return B, Hq, Hk, Hv, N, draw(st.sampled_from([D, 130, 257, 300])), draw(st.sampled_from([E, 129, 260]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=_host_shapes(), l2=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_through_host_programs(lasp, shape, l2, seed, monkeypatch):
    """LASP_DELTA_KERNELS=host over random head maps, lengths and dims (up to 300): the op through the CUDA
    kernels' block programs on the host against the float64 recurrence."""
    monkeypatch.setenv("LASP_DELTA_KERNELS", "host")
    ins = _inputs(seed, *shape)
    got = _run(_ours(lasp, use_qk_l2norm=l2), *ins)
    want = _run(_ref(use_qk_l2norm=l2), *ins)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-8, atol=1e-8, msg=lambda m: f"{shape} {key}: {m}")


@st.composite
def _packed_layouts(draw):
    H = draw(st.sampled_from([1, 2, 4]))
    divisors = [d for d in range(1, H + 1) if H % d == 0]
    Hq, Hk = draw(st.sampled_from(divisors)), draw(st.sampled_from(divisors))
    lens = draw(st.lists(st.integers(1, 140), min_size=1, max_size=5))
    return H, Hq, Hk, lens, draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.booleans())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=_packed_layouts(), seed=st.integers(0, 2**31 - 1))
def test_random_packed_states_match_each_alone(lasp, layout, seed):
    """Random document layouts (lengths 1..140, across chunk boundaries), head maps and head dims: the packed
    call with per-document initial and final states is each document alone, outputs, final states and every
    gradient (float64)."""
    H, Hq, Hk, lens, D, E, with_init = layout
    N, nd = sum(lens), len(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta, _, do, _ = _inputs(seed, 1, Hq, Hk, H, N, D, E, resets=False)
    s0 = randn((nd, H, D, E), gen(seed + 1), F64) if with_init else None
    dS = randn((nd, H, D, E), gen(seed + 2), F64)
    _packed_vs_each_alone(lasp, lasp_ref.gated_delta_recurrent, q, k, v, g, beta, s0, do, dS, cu, 1e-9)


# ----------------------------------------------------------------------------------------------
# Across GPUs (NCCL): the ring over the process group and over peer memory (the two-call hop), the all-gather
# and the scan, against the one-rank call on the same device (float32)

_NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
NCCL_DELTA = ["ring/nccl", "ring/peer", "allgather", "scan"]


def _nccl_worker(rank, world, port, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    lasp = import_lasp()
    pieces = [50, 1, 130, 64][:world]
    N = sum(pieces)
    q, k, v, g, beta, s0, do, dS = _inputs(4000 + world, 1, 2, 1, 4, N, 64, 64, dtype=torch.float32, resets=True)
    P, n = sum(pieces[:rank]), pieces[rank]
    results = {}
    for strategy in NCCL_DELTA:
        lasp.set_ring_transport(strategy.split("/")[1] if "/" in strategy else "auto")
        try:
            leaves = [t.narrow(2, P, n).clone().cuda().requires_grad_() for t in (q, k, v, g, beta)]
            st = s0.float().cuda().requires_grad_()
            o, f = lasp.gated_delta_attention(*leaves, initial_state=st, output_final_state=True,
                                              group=dist.group.WORLD, strategy=strategy.split("/")[0])
            cot = dS.float().cuda() if rank == world - 1 else torch.zeros_like(f)
            gr = torch.autograd.grad([o, f], leaves + [st], [do.narrow(2, P, n).float().cuda(), cot])
        finally:
            lasp.set_ring_transport("auto")
        results[strategy] = dict(o=o.detach().cpu(), grads=[x.detach().cpu() for x in gr])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_matches_one_rank(lasp, world):
    if _NGPU < world:
        pytest.skip(f"needs {world} CUDA devices for nccl, found {_NGPU}")
    res = spawn_world(_nccl_worker, world, (), 240, f"gated delta rule (nccl, world={world})")
    pieces = [50, 1, 130, 64][:world]
    N = sum(pieces)
    q, k, v, g, beta, s0, do, dS = _inputs(4000 + world, 1, 2, 1, 4, N, 64, 64, dtype=torch.float32, resets=True)
    leaves = [t.clone().cuda().requires_grad_() for t in (q, k, v, g, beta)]
    st = s0.float().cuda().requires_grad_()
    o, f = lasp.gated_delta_attention(*leaves, initial_state=st, output_final_state=True)
    want = [x.cpu() for x in torch.autograd.grad([o, f], leaves + [st], [do.float().cuda(), dS.float().cuda()])]
    for strategy in NCCL_DELTA:
        parts = [res[r][strategy] for r in range(world)]
        err = rel_err(torch.cat([p["o"] for p in parts], 2), o.detach().cpu())
        assert err < 1e-5, f"{strategy} o: {err:.2e}"
        for i, name in enumerate(["dq", "dk", "dv", "dg", "dbeta"]):
            err = rel_err(torch.cat([p["grads"][i] for p in parts], 2), want[i])
            assert err < 1e-5, f"{strategy} {name}: {err:.2e}"
        err = rel_err(parts[0]["grads"][5], want[5])
        assert err < 1e-5, f"{strategy} d initial state: {err:.2e}"
