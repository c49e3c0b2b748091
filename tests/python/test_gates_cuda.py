"""Per-token gates (g) and head maps (q, k, v with three head counts) on CUDA tensors.

Every case runs the op on the GPU and checks its output, final state and every gradient (dq, dk, dv, dg,
d_initial_state) against the float64 token-by-token recurrence (reference.gated_recurrent_grads) computed
on the CPU from the very same values; for float16/bfloat16 the tolerance also reads the masked sum in that
dtype (test_gates.reference_in_dtype), as the CPU tests do.

Covered: the CPU gate cases of test_gates.py; sequences long enough for the kernels to cut each (b, h)
into several segments (the segments' transitions and the gate gradient's terms across them); head maps
(GVA as Mamba-2's shared B and C, GQA with gates, mixed maps), head dims up to 256, strong gates and resets
on segment boundaries; the op against itself on the CPU. Which family each role runs is checked by the
GoogleTest CudaKernelsApi.GatedKernelChoice.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, NO_CUDA_REASON, acc_dtype, assert_close_to_ref, gen, poison_allocator, randn, ref
from test_gates import (CASES, LOWP, _case_id, check_all, gated_quadratic, make_case_inputs, reference64,
                        reference_in_dtype, run_op)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
NEG_INF = float("-inf")


def to_cuda_leaf(t):
    return None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)


def cpu(res):
    return {k: (None if v is None else v.detach().cpu()) for k, v in res.items()}


def run_cuda(lasp, q, k, v, g, decay, scale, s0, do, dS, layout):
    """run_op on CUDA copies of the (CPU) leaves, after the allocator's free memory is filled with NaN (an
    output element left unwritten then shows); results back on the CPU."""
    qc, kc, vc, gc, sc = (to_cuda_leaf(t) for t in (q, k, v, g, s0))
    dc = None if decay is None else decay.cuda()
    poison_allocator("cuda")
    got = run_op(lasp, qc, kc, vc, gc, dc, scale, sc, do.cuda(), None if dS is None else dS.cuda(), layout)
    return cpu(got)


# ----------------------------------------------------------------------------------------------
# 1. The CPU gate cases, and longer ones that the kernels cut into segments

C = dict
LONG = [
    # several segments per (b, h) (few (b, h) pairs, long rows); resets on chunk and segment boundaries
    C(dtype=F32, B=1, H=2, Hkv=1, N=3000, D=32, E=48, decay="alibi", state=True, dS=True, layout="bhnd",
      gates="mixed", resets=[(64, None), (1023, 1), (1024, 0), (2047, None)]),
    C(dtype=F64, B=1, H=1, Hkv=1, N=2500, D=16, E=8, decay=None, state=True, dS=True, layout="bnhd", gates="soft"),
    C(dtype=F32, B=1, H=2, Hkv=2, N=2049, D=64, E=64, decay="mixed", state=False, dS=True, layout="bhnd",
      gates="strong"),
    C(dtype=BF16, B=1, H=2, Hkv=1, N=2048, D=128, E=64, decay=None, state=True, dS=True, layout="bnhd",
      gates="soft"),
    C(dtype=F16, B=2, H=2, Hkv=2, N=1500, D=64, E=128, decay="alibi", state=True, dS=False, layout="bhnd",
      gates="mixed"),
    # 16-bit, D and E in {64, 128}: the forward main pass on the tensor cores (wgmma on sm_90), resets on
    # and beside chunk boundaries, strong gates, zero gates with a decay
    C(dtype=BF16, B=2, H=4, Hkv=2, N=1000, D=128, E=128, decay="alibi", state=True, dS=True, layout="bhnd",
      gates="mixed", resets=[(63, None), (64, 1), (999, 0)]),
    C(dtype=F16, B=1, H=2, Hkv=2, N=4100, D=64, E=64, decay=None, state=True, dS=True, layout="bnhd",
      gates="strong"),
    C(dtype=BF16, B=1, H=1, Hkv=1, N=65, D=64, E=128, decay="strong", state=False, dS=True, layout="bhnd",
      gates="zero"),
    C(dtype=BF16, B=3, H=2, Hkv=1, N=129, D=128, E=64, decay="mixed", state=True, dS=False, layout="bnhd",
      gates="soft"),
    # without a final-state cotangent: the backward's fused pass alone (with one, the same pass and then
    # the cotangent's terms, attention.cpp): strong gates, where dg is small beside the pairs (t, t) it
    # leaves out
    C(dtype=F16, B=1, H=2, Hkv=2, N=4100, D=64, E=64, decay=None, state=True, dS=False, layout="bnhd",
      gates="strong"),
    C(dtype=BF16, B=1, H=1, Hkv=1, N=65, D=64, E=128, decay="strong", state=False, dS=False, layout="bhnd",
      gates="zero"),
    C(dtype=BF16, B=2, H=4, Hkv=2, N=1000, D=128, E=128, decay="alibi", state=True, dS=False, layout="bnhd",
      gates="mixed", resets=[(63, None), (64, 1), (999, 0)]),
    # long rows: many segments of phase 1 (the local states, on wgmma where the main passes are) and
    # chunks; resets on a segment boundary and beside one
    C(dtype=BF16, B=1, H=2, Hkv=1, N=4001, D=128, E=128, decay="mixed", state=True, dS=True, layout="bhnd",
      gates="mixed", resets=[(2047, 0), (3072, 1)]),
    C(dtype=F16, B=1, H=1, Hkv=1, N=3000, D=64, E=128, decay=None, state=False, dS=True, layout="bnhd",
      gates="soft"),
    # the sm_90 kernels' factored chunk weights (wgmma.cuh, GateTile): chunks summing to about -64, on both
    # sides of the bound, and soft gates with resets inside factored chunks (at a chunk's first and last
    # token, two in a row, beside a segment boundary)
    C(dtype=BF16, B=1, H=2, Hkv=1, N=3000, D=128, E=128, decay=None, state=True, dS=False, layout="bhnd",
      gates="edge", resets=[(100, None), (1000, 1)]),
    C(dtype=F16, B=2, H=2, Hkv=2, N=1100, D=64, E=128, decay="alibi", state=True, dS=True, layout="bnhd",
      gates="edge"),
    C(dtype=BF16, B=2, H=2, Hkv=2, N=700, D=64, E=64, decay="alibi", state=True, dS=False, layout="bnhd",
      gates="soft", resets=[(0, None), (63, None), (64, 1), (130, 0), (131, 0), (699, None)]),
    C(dtype=F16, B=1, H=4, Hkv=2, N=2600, D=128, E=64, decay="mixed", state=False, dS=False, layout="bhnd",
      gates="soft", resets=[(511, None), (512, 2), (1300, 3), (2047, None)]),
    # head dims up to 256 (odd ones too)
    C(dtype=BF16, B=1, H=2, Hkv=1, N=300, D=256, E=256, decay="alibi", state=True, dS=True, layout="bhnd",
      gates="soft"),
    C(dtype=F32, B=1, H=1, Hkv=1, N=200, D=255, E=129, decay=None, state=True, dS=True, layout="bnhd",
      gates="mixed"),
]


@pytest.mark.parametrize("c", [pytest.param(c, id=_case_id(c)) for c in CASES + LONG])
def test_cuda_matches_gated_reference(lasp, c, seed):
    dt, layout = c["dtype"], c["layout"]
    q, k, v, g, s0, do, dS, decay = make_case_inputs(c, seed)
    scale = None if c["N"] % 2 else 0.4
    got = run_cuda(lasp, q, k, v, g, decay, scale, s0, do, dS, layout)
    assert got["o"].dtype == dt and got["final_state"].dtype == acc_dtype(dt)
    assert got["dg"] is not None and got["dg"].dtype == g.dtype and got["dg"].shape == g.shape
    want = reference64(q, k, v, g, decay, scale, s0, do, dS, layout)
    lowp = reference_in_dtype(q, k, v, g, decay, scale, s0, do, dS, layout, dt) if dt in LOWP else None
    check_all(got, want, dt, lowp, where="cuda ", gdtype=g.dtype)


@pytest.mark.parametrize("c", [pytest.param(c, id=_case_id(c)) for c in CASES if c["dtype"] == F64 and c["N"] > 1])
def test_cuda_agrees_with_cpu_op(lasp, c, seed):
    """float64: the CUDA op and the CPU op on the same values agree to rounding."""
    q, k, v, g, s0, do, dS, decay = make_case_inputs(c, seed)
    got = run_cuda(lasp, q, k, v, g, decay, 0.5, s0, do, dS, c["layout"])
    want = cpu(run_op(lasp, q, k, v, g, decay, 0.5, s0, do, dS, c["layout"]))
    for name, a in want.items():
        if a is not None:
            assert_close_to_ref(f"cuda vs cpu {name}", got[name], a, F64)


# ----------------------------------------------------------------------------------------------
# 2. Head maps (with and without gates)

# (B, Hq, Hk, Hv, N, D, E)
HEAD_MAPS = [
    (2, 1, 1, 8, 1100, 32, 16),   # GVA, Mamba-2-like: one q/k head shared by every value head
    (1, 2, 2, 6, 700, 16, 24),    # GVA with grouped q/k
    (1, 6, 2, 3, 300, 8, 12),     # k blocks of 3, v blocks of 2 (not nested)
    (1, 4, 1, 1, 257, 9, 5),      # MQA
    (1, 4, 2, 2, 2100, 64, 64),   # GQA, several segments
    # on the tensor cores (16-bit; wgmma on sm_90 at D, E in {64, 128}, mma.sync at other multiples of 8)
    (2, 1, 1, 8, 1100, 128, 64),  # GVA, Mamba-2-like
    (1, 2, 2, 6, 700, 64, 128),   # GVA with grouped q/k
    (1, 6, 2, 3, 300, 64, 64),    # three head counts
    (1, 2, 4, 4, 520, 128, 128),  # only q heads shared
    (2, 1, 1, 4, 600, 96, 32),    # GVA at mma.sync's dims
]


def _maps_problem(B, Hq, Hk, Hv, N, D, E, dtype, seed, gates):
    H = max(Hq, Hv)
    g_ = gen(seed)
    q, k, v = randn((B, Hq, N, D), g_, dtype), randn((B, Hk, N, D), g_, dtype), randn((B, Hv, N, E), g_, dtype)
    g = None
    if gates:
        g = -F.softplus(randn((B, H, N), g_, F64) - 1.0).to(dtype)
        g[:, :, N // 3] = NEG_INF
        g[0, 0, 0] = NEG_INF
    rates = (torch.rand(H, generator=g_) * 0.05).float()
    s0 = randn((B, H, D, E), g_, acc_dtype(dtype))
    do = randn((B, H, N, E), g_, dtype)
    dS = randn((B, H, D, E), g_, acc_dtype(dtype))
    return q, k, v, g, rates, s0, do, dS


def _maps_in_dtype(q, k, v, g, rates, s0, do, dS, dtype):
    """The masked sum in dtype (test_gates.gated_quadratic) on q, k, v expanded to the output heads, with
    autograd (which sums the expanded heads' gradients back): the dtype's own error for the tolerance rule."""
    B, Hq, N, _ = q.shape
    H = max(Hq, v.shape[1])
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gl = None if g is None else g.detach().clone().requires_grad_()
    sl = s0.detach().clone().requires_grad_()
    qe, ke, ve = (t.repeat_interleave(H // t.shape[1], dim=1) for t in leaves)
    o, f = gated_quadratic(qe, ke, ve, gl, rates, None, sl, dtype)
    ins = leaves + [sl] + ([gl] if gl is not None else [])
    gr = torch.autograd.grad([o, f], ins, [do.to(dtype), dS.to(dtype)])
    out = dict(o=o.detach(), final_state=f.detach(), dq=gr[0], dk=gr[1], dv=gr[2], d_initial_state=gr[3])
    if gl is not None:
        out["dg"] = gr[4]
    return out


@pytest.mark.parametrize("gates", [True, False], ids=["gates", "nogates"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape", HEAD_MAPS, ids=[f"B{s[0]}-q{s[1]}k{s[2]}v{s[3]}-N{s[4]}-D{s[5]}E{s[6]}" for s in HEAD_MAPS])
def test_cuda_head_maps(lasp, shape, dtype, gates, seed):
    _check_head_maps(lasp, shape, dtype, gates, seed)


# The sm_90a backward adds the gradients of shared q / k / v heads into fp32 sums in L2 (in no fixed order);
# under torch.use_deterministic_algorithms it writes them per output head and sums them in a second pass
# instead. Both against the float64 recurrence (the first in test_cuda_head_maps), and the second bitwise
# reproducible (without gates: the CUDA kernels sum dg with atomic adds either way). The shapes: shared q and
# k heads (GVA), shared k and v heads, shared q.
@pytest.mark.parametrize("shape", [HEAD_MAPS[5], HEAD_MAPS[7], HEAD_MAPS[8]],
                         ids=["gva-D128E64", "q6k2v3-D64E64", "q2k4v4-D128E128"])
def test_cuda_head_maps_deterministic_sums(lasp, shape, seed):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first = _check_head_maps(lasp, shape, BF16, False, seed)
        again = _check_head_maps(lasp, shape, BF16, False, seed)
    finally:
        torch.use_deterministic_algorithms(prev)
    for name in ("dq", "dk", "dv"):
        assert torch.equal(first[name], again[name]), f"{name} differs between two deterministic runs"


def _check_head_maps(lasp, shape, dtype, gates, seed):
    B, Hq, Hk, Hv, N, D, E = shape
    q, k, v, g, rates, s0, do, dS = _maps_problem(B, Hq, Hk, Hv, N, D, E, dtype, seed, gates)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([g.clone().requires_grad_()] if gates else [])
    cq, ck, cv = (t.detach().cuda().requires_grad_() for t in leaves[:3])
    cg = leaves[3].detach().cuda().requires_grad_() if gates else None
    cs = s0.cuda().requires_grad_()
    o, f = lasp.lasp_attention(cq, ck, cv, rates.cuda(), g=cg, initial_state=cs, output_final_state=True)
    ins = [cq, ck, cv] + ([cg] if gates else []) + [cs]
    gr = torch.autograd.grad([o, f], ins, [do.cuda(), dS.cuda()])
    got = dict(o=o, final_state=f, dq=gr[0], dk=gr[1], dv=gr[2], d_initial_state=gr[-1])
    if gates:
        got["dg"] = gr[3]
    r = ref.gated_recurrent_grads(q.to(F64), k.to(F64), v.to(F64), None if g is None else g.to(F64), rates, None,
                                  s0.to(F64), do.to(F64), dS.to(F64))
    lowp = _maps_in_dtype(q, k, v, g, rates, s0, do, dS, dtype) if dtype in LOWP else {}
    # as test_gates.check_all: every quantity under the inputs' dtype's rule (bf16: the masked sum in bf16
    # gives the dtype's own error)
    failures = []
    for name, a in got.items():
        try:
            assert_close_to_ref(name, a.detach().cpu(), r[name], dtype, lowp.get(name))
        except AssertionError as e:
            failures.append(str(e).split("\n")[0])
    assert not failures, "\n".join(failures)
    assert o.shape == (B, max(Hq, Hv), N, E)
    return {name: t.detach() for name, t in got.items()}


BAD_G = {"positive": 0.5, "plus-inf": float("inf"), "nan": float("nan"), "positive-tiny": 1e-30}


@pytest.mark.parametrize("what", list(BAD_G))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_cuda_bad_gate_values(lasp, what, dtype):
    """A positive or NaN log gate on CUDA raises a ValueError that names g, as on the CPU, from both ops, with
    and without autograd; the device still works afterwards. (The value is read after the op's kernels are
    queued, not with a host sync before them.)"""
    B, H, N, D = 2, 3, 200, 64
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
    g = -torch.rand(B, H, N, device="cuda")
    g[1, 2, 130] = BAD_G[what]
    beta = torch.rand(B, H, N, device="cuda")
    for grad in (False, True):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v, g)]
        with pytest.raises(ValueError, match=r"(^|\W)g(\W|$).*<= 0"):
            lasp.lasp_attention(*leaves[:3], g=leaves[3])
        with pytest.raises(ValueError, match=r"g must be <= 0"):
            lasp.gated_delta_attention(*leaves[:3], leaves[3], beta, use_qk_l2norm=True)
    g[1, 2, 130] = float("-inf")  # a reset is allowed
    o = lasp.lasp_attention(q, k, v, g=g)
    od = lasp.gated_delta_attention(q, k, v, g, beta, use_qk_l2norm=True)
    torch.cuda.synchronize()
    assert torch.isfinite(o).all() and torch.isfinite(od).all()


@pytest.mark.parametrize("view", ["bnhd", "strided"])
def test_cuda_bad_gate_values_of_views(lasp, view):
    """The check reads g as given: a transposed (bnhd) view, and a strided slice (not dense)."""
    B, H, N, D = 1, 2, 130, 64
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=BF16) for _ in range(3))
    big = -torch.rand(B, N, 2 * H, device="cuda")
    g = big[..., :H] if view == "strided" else big[..., :H].contiguous()
    g[0, 129, 1] = 0.25
    with pytest.raises(ValueError, match=r"(^|\W)g(\W|$).*<= 0"):
        lasp.lasp_attention(q, k, v, g=g, layout="bnhd")
    g[0, 129, 1] = float("nan")
    with pytest.raises(ValueError, match="got NaN"):
        lasp.lasp_attention(q, k, v, g=g, layout="bnhd")


def test_cuda_gated_call_in_a_cuda_graph(lasp):
    """A gated forward captured in a CUDA graph (where no host may wait, so g's values are not read there)
    replays to the eager result."""
    B, H, N, D = 1, 2, 300, 64
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=BF16) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, H, N, device="cuda")) / 8
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lasp.lasp_attention(q, k, v, g=g)  # warm-up off the default stream, as CUDA graphs ask
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lasp.lasp_attention(q, k, v, g=g)
    q.copy_(torch.randn_like(q))
    want = lasp.lasp_attention(q, k, v, g=g)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
