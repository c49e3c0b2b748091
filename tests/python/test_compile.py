"""Dispatcher registration: torch.library.opcheck on the ops, and torch.compile(fullgraph=True).

opcheck runs all of its default checks (test_schema, test_autograd_registration,
test_faketensor, test_aot_dispatch_dynamic); none is excluded. test_autograd_registration is
applicable: lasp_attention is differentiable and registers its C++ autograd function under the
Autograd key, which is exactly what that check verifies when inputs require grad. For the internal
lasp_attention_fwd / lasp_attention_bwd ops (no autograd formula of their own) we call opcheck
with inputs that do not require grad, where the check is a no-op by design.

The forward hands the backward its segment states as op data: lasp_attention_fwd's fourth output
(seg_states, kept when seg_nseg > 1) and lasp_attention_bwd's seg_states / seg_seglen arguments; the
tests below check both ops with them, their errors, their meta shapes, and what a compiled graph passes.
"""

import re
import zlib

import pytest
import torch
from torch.library import opcheck

from conftest import (
    DEVICES,
    HAS_CUDA,
    NO_CUDA_REASON,
    assert_close_to_ref,
    gen,
    make_decay,
    make_qkv,
    make_state,
    randn,
    ref,
    rel_err,
)


@pytest.fixture
def seed(request):
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)


OPCHECK_CASES = [
    # H, Hkv, N, decay, state, requires_grad, dtype
    pytest.param(4, 2, 9, "alibi", True, True, torch.float32, id="gqa-decay-state-grad"),
    pytest.param(2, 2, 7, None, False, True, torch.float32, id="plain-grad"),
    pytest.param(2, 1, 5, "mixed", True, False, torch.float32, id="mqa-state-nograd"),
    pytest.param(2, 2, 6, "alibi", True, True, torch.float64, id="fp64-state-grad"),
    pytest.param(2, 2, 70, "alibi", False, True, torch.bfloat16, id="bf16-grad"),
]


@pytest.mark.parametrize("H,Hkv,N,decay_kind,with_state,requires_grad,dtype", OPCHECK_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lasp_attention(lasp, device, H, Hkv, N, decay_kind, with_state, requires_grad, dtype, seed):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU dtype of the op")
    B, D, E = 2, 4, 6
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device=device, seed=seed, requires_grad=requires_grad)
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed, requires_grad=requires_grad) if with_state else None
    decay = make_decay(decay_kind, H, device, g=gen(seed))
    opcheck(torch.ops.lasp.lasp_attention, (q, k, v, decay, 0.7, s0, None))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd_bwd(lasp, device, with_state, seed):
    B, H, Hkv, N, D, E = 2, 4, 2, 11, 4, 6
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False) if with_state else None
    decay = make_decay("alibi", H, device)
    fwd_args = (q, k, v, decay, 0.7, s0, None)
    opcheck(torch.ops.lasp.lasp_attention_fwd, fwd_args)
    opcheck(torch.ops.lasp.lasp_attention_fwd, fwd_args + ("ring", 1, N))  # one segment: nothing kept
    o, f, state_in, seg = torch.ops.lasp.lasp_attention_fwd(*fwd_args)
    assert seg.shape == (0,) and seg.dtype == torch.float32 and seg.device == q.device
    g = gen(seed + 1)
    do = randn(o.shape, g, torch.float32, device)
    dS = randn(f.shape, g, torch.float32, device)
    bwd_args = (q, k, v, do, dS, decay, 0.7, state_in.clone(), None)
    opcheck(torch.ops.lasp.lasp_attention_bwd, bwd_args)
    opcheck(torch.ops.lasp.lasp_attention_bwd, (q, k, v, do, None, None, 0.7, state_in.clone(), None))
    # the forward's 0-element seg_states ("none kept") passed on, as the backward takes them
    opcheck(torch.ops.lasp.lasp_attention_bwd, bwd_args + ("ring", seg.clone(), 0))


@pytest.mark.parametrize("as_resets", ["0", "1"], ids=["starts-as-gates", "starts-as-resets"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_document_starts(lasp, device, as_resets, seed, monkeypatch):
    """g as bool document starts (what lasp_attention passes for cu_seqlens without log gates), run as -inf
    gates or as such (LASP_DOC_STARTS=1): the op, its forward and its backward (whose dg has 0 elements)
    pass opcheck, and the op's outputs and gradients equal those of -inf log gates at the starts (exactly:
    these inputs take the CPU or generic kernels, which read the starts as gates either way)."""
    monkeypatch.setenv("LASP_DOC_STARTS", as_resets)
    B, H, Hkv, N, D, E = 1, 4, 2, 77, 8, 6
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=True)
    decay = make_decay("alibi", H, device)
    starts = torch.zeros(B, 1, N, dtype=torch.bool, device=device)
    starts[..., [0, 5, 6, 64, 70]] = True
    starts = starts.expand(B, H, N)
    opcheck(torch.ops.lasp.lasp_attention, (q, k, v, decay, 0.7, None, None, "ring", starts))
    fwd = torch.ops.lasp.lasp_attention_fwd(q.detach(), k.detach(), v.detach(), decay, 0.7, None, None, "ring", 0, 0,
                                            starts)
    do = randn(fwd[0].shape, gen(seed + 1), torch.float32, device)
    bwd_args = (q.detach(), k.detach(), v.detach(), do, None, decay, 0.7, fwd[2], None, "ring", None, 0, starts)
    opcheck(torch.ops.lasp.lasp_attention_bwd, bwd_args)
    assert torch.ops.lasp.lasp_attention_bwd(*bwd_args)[4].numel() == 0
    g = torch.zeros(B, H, N, device=device).masked_fill(starts, float("-inf"))
    got = torch.ops.lasp.lasp_attention(q, k, v, decay, 0.7, None, None, "ring", starts)[0]
    want = torch.ops.lasp.lasp_attention(q, k, v, decay, 0.7, None, None, "ring", g)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gg = torch.autograd.grad(got, (q, k, v), do)
    gw = torch.autograd.grad(want, (q, k, v), do)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _forward_split(q, k, v, decay):
    """The (nseg, seglen) the CUDA forward uses for these inputs, read off the error of a wrong request (a
    segment length of 1 is never one: segments are whole 64-token chunks)."""
    with pytest.raises(ValueError, match=r"seg_nseg, seg_seglen must be the forward's split of this call") as e:
        torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.5, None, None, "ring", 2, 1)
    m = re.search(r"the forward's split of this call, \((\d+), (\d+)\)", str(e.value))
    assert m, str(e.value)
    assert str(e.value).rstrip().endswith("got (2, 1)"), str(e.value)
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_opcheck_fwd_bwd_cuda_segment_states(lasp, seed):
    """seg_nseg > 1 on CUDA: the forward returns its segment states, the backward takes them; opcheck on both."""
    B, H, N, D = 1, 2, 4096, 64
    q, k, v = make_qkv(B, H, H, N, D, D, dtype=torch.bfloat16, device="cuda", seed=seed, requires_grad=False)
    s0 = make_state(B, H, D, D, dtype=torch.bfloat16, device="cuda", seed=seed, requires_grad=False)
    decay = make_decay("alibi", H, "cuda")
    nseg, seglen = _forward_split(q, k, v, decay)
    assert nseg > 1, f"B * H = {B * H} heads of {N} tokens should be cut into segments, got ({nseg}, {seglen})"
    fwd_args = (q, k, v, decay, 0.5, s0, None, "ring", nseg, seglen)
    opcheck(torch.ops.lasp.lasp_attention_fwd, fwd_args)
    o, f, state_in, seg = torch.ops.lasp.lasp_attention_fwd(*fwd_args)
    assert seg.shape == (B, H, nseg, D, D) and seg.dtype == torch.float32 and seg.is_contiguous()
    g = gen(seed + 1)
    do, dS = randn(o.shape, g, torch.bfloat16, "cuda"), randn(f.shape, g, torch.float32, "cuda")
    opcheck(torch.ops.lasp.lasp_attention_bwd, (q, k, v, do, dS, decay, 0.5, state_in, None, "ring", seg, seglen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwd_op_segment_split_args_cpu(lasp, dtype, seed):
    """CPU cuts no segments: seg_nseg 0 or 1 gives a 0-element seg_states (acc dtype), seg_nseg > 1 raises
    naming it, and negative values raise naming the argument."""
    B, H, N, D, E = 1, 2, 9, 4, 6
    q, k, v = make_qkv(B, H, H, N, D, E, dtype=dtype, device="cpu", seed=seed, requires_grad=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None)
    for nseg, seglen in [(0, 0), (1, 0), (1, N), (0, 64)]:
        got = torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", nseg, seglen)
        assert got[3].shape == (0,) and got[3].dtype == acc, (nseg, seglen)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (nseg, seglen)
    with pytest.raises(ValueError, match=r"seg_nseg > 1 asks to keep the segment states, but the forward of this "
                       r"call on cpu cuts no segments .*got seg_nseg = 2, seg_seglen = 8"):
        torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", 2, 8)
    with pytest.raises(ValueError, match=r"seg_nseg must be >= 0 .*got -1"):
        torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", -1, 0)
    with pytest.raises(ValueError, match=r"seg_seglen must be >= 0 .*got -3"):
        torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", 0, -3)


ATEN_NAME = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16"}  # as C++ prints them


def _bwd_seg_errors(q, B, H, D, E, acc):
    """(seg_states, seg_seglen, exception type, message pattern) for each bad segment-state argument."""
    dev = q.device
    other = torch.float64 if acc == torch.float32 else torch.float32
    shape = rf"\(B, H, nseg, D, E\) = \({B}, {H}, nseg(?: >= 1)?, {D}, {E}\)"
    return [
        (torch.zeros(B, H, 2, D, E, dtype=other, device=dev), 64, TypeError,
         rf"seg_states must be {ATEN_NAME[acc]} \(the forward's fourth output\) for {ATEN_NAME[q.dtype]} inputs, "
         rf"got {ATEN_NAME[other]}"),
        (torch.zeros(B, H, 2, D, dtype=acc, device=dev), 64, ValueError,
         rf"seg_states must be the forward's fourth output, of shape {shape} .*got shape \[{B}, {H}, 2, {D}\]"),
        (torch.zeros(B, H + 1, 2, D, E, dtype=acc, device=dev), 64, ValueError,
         rf"seg_states must be the forward's fourth output, of shape {shape} .*got shape \[{B}, {H + 1}, 2, {D}, {E}\]"),
        (torch.zeros(B, H, 2, E, D, dtype=acc, device=dev), 64, ValueError,
         rf"seg_states must be the forward's fourth output, of shape {shape} .*got shape \[{B}, {H}, 2, {E}, {D}\]"),
        (torch.zeros(B, H, 0, D, E, dtype=acc, device=dev), 64, ValueError,
         rf"seg_states must be the forward's fourth output, of shape {shape} .*got shape \[{B}, {H}, 0, {D}, {E}\]"),
        (torch.zeros(3, dtype=acc, device=dev), 64, ValueError,
         rf"seg_states must be the forward's fourth output, of shape {shape} .*got shape \[3\]"),
        (torch.zeros(B, H, 2, D, E, dtype=acc, device="meta"), 64, ValueError,
         rf"seg_states must be on the device of q \({dev}\), got meta"),
        (torch.zeros(B, H, 2, D, E, dtype=acc, device=dev), 0, ValueError,
         r"seg_seglen must be the forward's segment length \(>= 1\) when seg_states are given, got 0"),
        (None, -1, ValueError, r"seg_seglen must be >= 0 .*got -1"),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bwd_op_segment_states_errors_cpu(lasp, dtype, seed):
    """Every bad seg_states / seg_seglen of the backward op raises, naming the argument, what it must be and
    what came; a 0-element seg_states (the forward kept none) is None, and so is a well-formed one that the
    backend cannot use (CPU cuts no segments: it computes everything itself)."""
    B, H, Hkv, N, D, E = 2, 4, 2, 11, 4, 6
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device="cpu", seed=seed, requires_grad=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    decay = make_decay("alibi", H)
    o, f, state_in, seg = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, None, None)
    g = gen(seed + 1)
    do, dS = randn(o.shape, g, dtype), randn(f.shape, g, acc)
    args = (q, k, v, do, dS, decay, 0.7, state_in, None, "ring")
    want = torch.ops.lasp.lasp_attention_bwd(*args[:9])
    for seg_states, seglen in [(seg, 0), (None, 0), (torch.full((B, H, 2, D, E), float("nan"), dtype=acc), 8)]:
        got = torch.ops.lasp.lasp_attention_bwd(*args, seg_states, seglen)
        for name, a, b in zip(["dq", "dk", "dv", "d_initial_state"], got, want):
            assert torch.equal(a, b), (name, None if seg_states is None else seg_states.shape)
    for seg_states, seglen, exc, pattern in _bwd_seg_errors(q, B, H, D, E, acc):
        with pytest.raises(exc, match="lasp_attention_bwd: " + pattern):
            torch.ops.lasp.lasp_attention_bwd(*args, seg_states, seglen)


def test_meta_kernels_segment_states(lasp):
    """The meta kernels (what torch.compile and opcheck trace with): seg_states is (B, H, seg_nseg, D, E) in the
    acc dtype when seg_nseg > 1, else 0 elements; the backward's meta kernel refuses what the real one does."""
    B, H, Hkv, N, D, E = 2, 4, 2, 37, 8, 12
    for dtype, acc in [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)]:
        q = torch.empty(B, H, N, D, dtype=dtype, device="meta")
        k = torch.empty(B, Hkv, N, D, dtype=dtype, device="meta")
        v = torch.empty(B, Hkv, N, E, dtype=dtype, device="meta")
        for nseg, want in [(0, (0,)), (1, (0,)), (3, (B, H, 3, D, E))]:
            out = torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", nseg, 13)
            assert out[3].shape == want and out[3].dtype == acc and out[3].device.type == "meta", (dtype, nseg)
        with pytest.raises(ValueError, match="lasp_attention_fwd: seg_nseg must be >= 0"):
            torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", -2, 0)
        do = torch.empty(B, H, N, E, dtype=dtype, device="meta")
        s_in = torch.empty(0, dtype=acc, device="meta")
        seg = torch.empty(B, H, 3, D, E, dtype=acc, device="meta")
        dq, dk, dv, ds, dg = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, None, None, 0.5, s_in, None, "ring", seg, 13)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and ds.shape == (B, H, D, E)
        assert dg.shape == (0,) and dg.dtype == acc  # no gates: no gradient of g
        for seg_states, seglen, exc, pattern in _bwd_seg_errors(q, B, H, D, E, acc):
            if seg_states is not None and seg_states.device.type == "meta" and q.device.type == "meta":
                continue  # the wrong-device case needs two devices
            with pytest.raises(exc, match="lasp_attention_bwd: " + pattern):
                torch.ops.lasp.lasp_attention_bwd(q, k, v, do, None, None, 0.5, s_in, None, "ring", seg_states, seglen)


def test_fake_tensor_segment_states_shape(lasp):
    """Under FakeTensorMode (torch.compile's tracing) the forward op's fourth output has the meta kernel's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, H, N, D, E = 1, 2, 300, 8, 16
    with FakeTensorMode():
        q = torch.empty(B, H, N, D, dtype=torch.bfloat16)
        k = torch.empty(B, H, N, D, dtype=torch.bfloat16)
        v = torch.empty(B, H, N, E, dtype=torch.bfloat16)
        kept = torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None, "ring", 5, 64)[3]
        none = torch.ops.lasp.lasp_attention_fwd(q, k, v, None, 0.5, None, None)[3]
    assert kept.shape == (B, H, 5, D, E) and kept.dtype == torch.float32
    assert none.shape == (0,) and none.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_bwd_ops_match_reference(lasp, device, seed):
    """The internal ops compute what their names say (so opcheck is not checking a no-op)."""
    B, H, Hkv, N, D, E = 1, 4, 2, 13, 4, 6
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    decay = make_decay("alibi", H, device)
    o, f, state_in, seg = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, s0, None)
    assert torch.equal(state_in, s0), "without a group, state_in is the initial state"
    assert seg.numel() == 0, "seg_nseg = 0: no segment states kept"
    rq, rk, rv, rs0 = (t.double().requires_grad_() for t in (q, k, v, s0))
    ro, rf = ref.attention_ref(rq, rk, rv, decay, 0.7, rs0)
    assert_close_to_ref("o", o, ro, torch.float32)
    assert_close_to_ref("final_state", f, rf, torch.float32)
    g = gen(seed + 1)
    do, dS = randn(o.shape, g, torch.float32, device), randn(f.shape, g, torch.float32, device)
    dq, dk, dv, ds0, _ = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, 0.7, state_in, None)
    rg = torch.autograd.grad([ro, rf], [rq, rk, rv, rs0], [do.double(), dS.double()])
    for name, a, r in zip(["dq", "dk", "dv", "d_initial_state"], (dq, dk, dv, ds0), rg):
        assert_close_to_ref(name, a, r, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_op_without_initial_state_saves_no_state(lasp, device, seed):
    """Without a group and an initial state the forward's third output has 0 elements (no zero-filled state
    per call); the backward reads it as the zero state, and refuses a state_in of any other shape."""
    B, H, Hkv, N, D, E = 2, 4, 2, 13, 4, 6
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    decay = make_decay("alibi", H, device)
    o, f, state_in, _ = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, None, None)
    assert state_in.numel() == 0 and state_in.dtype == torch.float32
    zeros = torch.zeros(B, H, D, E, dtype=torch.float32, device=device)
    o0, f0, _, _ = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, zeros, None)
    assert torch.equal(o, o0) and torch.equal(f, f0)
    g = gen(seed + 1)
    do, dS = randn(o.shape, g, torch.float32, device), randn(f.shape, g, torch.float32, device)
    got = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, 0.7, state_in, None)
    want = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, 0.7, zeros, None)
    for name, a, b in zip(["dq", "dk", "dv", "d_initial_state"], got, want):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="state_in must be the forward's third output"):
        torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, 0.7, zeros[:, :1], None)


def _meta_like(t):
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_meta_kernel_shapes(lasp, dtype):
    B, H, Hkv, N, D, E = 2, 4, 1, 37, 8, 12
    q = torch.empty(B, H, N, D, dtype=dtype, device="meta")
    k = torch.empty(B, Hkv, N, D, dtype=dtype, device="meta")
    v = torch.empty(B, Hkv, N, E, dtype=dtype, device="meta")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.empty(B, H, D, E, dtype=acc, device="meta")
    o, f = torch.ops.lasp.lasp_attention(q, k, v, torch.empty(H, device="meta"), 0.5, s0, None)
    assert o.device.type == "meta" and o.shape == (B, H, N, E) and o.dtype == dtype
    assert f.shape == (B, H, D, E) and f.dtype == acc
    # The wrapper on meta tensors (bnhd layout) too.
    o2 = lasp.lasp_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bnhd")
    assert o2.shape == (B, N, H, E) and o2.dtype == dtype


# ----------------------------------------------------------------------------------------------
# torch.compile


def _f(lasp, layout):
    def f(q, k, v, decay, s0):
        o, fs = lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True, layout=layout)
        return torch.tanh(o).float().sum() + (fs * fs).sum(), o, fs

    return f


def _compare_compiled(lasp, backend, layout, seed, dynamic=False, N=37, with_state=True, dtype=torch.float32):
    torch._dynamo.reset()
    B, H, Hkv, D, E = 2, 4, 2, 8, 12
    f = _f(lasp, layout)
    cf = torch.compile(f, backend=backend, fullgraph=True, dynamic=dynamic)
    Ns = [N] if not dynamic else [N, N + 20]
    for n in Ns:
        q, k, v = make_qkv(B, H, Hkv, n, D, E, dtype=dtype, device="cpu", seed=seed + n, layout=layout)
        s0 = make_state(B, H, D, E, dtype=dtype, device="cpu", seed=seed + n) if with_state else None
        decay = make_decay("alibi", H)
        ins = [q, k, v] + ([s0] if s0 is not None else [])
        loss, o, fs = f(q, k, v, decay, s0)
        ge = torch.autograd.grad(loss, ins)
        closs, co, cfs = cf(q, k, v, decay, s0)
        gc = torch.autograd.grad(closs, ins)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert co.shape == o.shape and co.dtype == o.dtype
        assert rel_err(co, o) < tol
        assert rel_err(cfs, fs) < tol
        for name, a, b in zip(["dq", "dk", "dv", "d_initial_state"], gc, ge):
            assert rel_err(a, b) < tol, name
        # And eager itself is right (so agreement is not agreement on garbage).
        _, rf = ref.attention_ref(q, k, v, decay, None, s0, layout)
        assert_close_to_ref("final_state", fs, rf, dtype)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_compile_aot_eager(lasp, layout, with_state, seed):
    _compare_compiled(lasp, "aot_eager", layout, seed, with_state=with_state)


def test_compile_aot_eager_dynamic(lasp, seed):
    """Symbolic N: the meta kernel must not specialize (fullgraph, two lengths, one graph)."""
    _compare_compiled(lasp, "aot_eager", "bhnd", seed, dynamic=True)


def test_compile_aot_eager_fp64(lasp, seed):
    _compare_compiled(lasp, "aot_eager", "bnhd", seed, dtype=torch.float64)


def test_compile_inductor(lasp, seed):
    _compare_compiled(lasp, "inductor", "bhnd", seed)


def _capturing_backend(graphs):
    """aot_eager that keeps the forward and backward graphs AOTAutograd traced."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def _op_calls(graphs, op):
    """The calls of op in the graphs, each as {argument name: value} (defaults filled in)."""
    calls = []
    for gm in graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is op:
                calls.append({a.name: n.args[i] if i < len(n.args) else n.kwargs.get(a.name, a.default_value)
                              for i, a in enumerate(op._schema.arguments)})
    return calls


def _compiled_graph_case(lasp, device, dtype, N, dynamic, seed):
    """Compiles lasp_attention (fullgraph), runs it forward and backward with random cotangents; returns the
    op calls of the traced graphs, the inputs, the cotangents, the outputs and the gradients."""
    torch._dynamo.reset()
    B, H, D, E = 1, 2, 64, 64
    graphs = []

    def f(q, k, v, decay, s0):
        return lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True)

    cf = torch.compile(f, backend=_capturing_backend(graphs), fullgraph=True, dynamic=dynamic)
    q, k, v = make_qkv(B, H, H, N, D, E, dtype=dtype, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed)
    decay = make_decay("alibi", H, device)
    o, fs = cf(q, k, v, decay, s0)
    g = gen(seed + 1)
    cot = (randn(o.shape, g, dtype, device), randn(fs.shape, g, fs.dtype, device))
    gr = torch.autograd.grad([o, fs], [q, k, v, s0], cot)
    fwd = _op_calls(graphs, torch.ops.lasp.lasp_attention_fwd.default)
    bwd = _op_calls(graphs, torch.ops.lasp.lasp_attention_bwd.default)
    return fwd, bwd, (q, k, v, s0, decay), cot, (o, fs), gr


def _check_graph_keeps_nothing(fwd, bwd):
    """The traced graph passes the segment-state data explicitly and keeps none: the forward's split is asked
    only of concrete tensors with memory, never of the trace's fake or symbolic ones."""
    assert len(fwd) == 1 and len(bwd) == 1, (fwd, bwd)
    assert fwd[0]["seg_nseg"] == 0 and fwd[0]["seg_seglen"] == 0, fwd[0]
    assert bwd[0]["seg_states"] is None and bwd[0]["seg_seglen"] == 0, bwd[0]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_graph_segment_state_args_cpu(lasp, dynamic, seed):
    """torch.compile(fullgraph=True) of forward+backward traces the two ops with their new arguments, and
    the compiled outputs and gradients are those of eager."""
    fwd, bwd, ins, cot, outs, gr = _compiled_graph_case(lasp, "cpu", torch.float32, 70, dynamic, seed)
    _check_graph_keeps_nothing(fwd, bwd)
    q, k, v, s0, decay = (t.detach().clone().requires_grad_(t.requires_grad) for t in ins)
    o, fs = lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True)
    ge = torch.autograd.grad([o, fs], [q, k, v, s0], cot)
    assert torch.equal(outs[0], o) and torch.equal(outs[1], fs)
    for name, a, b in zip(["dq", "dk", "dv", "d_initial_state"], gr, ge):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_graph_segment_state_args_cuda(lasp, dynamic, seed):
    """On CUDA, for a sequence the forward cuts into segments: the compiled graph keeps no segment states
    (symbolic sizes under dynamic=True, fake tensors either way) and traces; its outputs and gradients are
    those of the float64 reference, by the bf16 rule."""
    N = 4096
    fwd, bwd, ins, cot, outs, gr = _compiled_graph_case(lasp, "cuda", torch.bfloat16, N, dynamic, seed)
    _check_graph_keeps_nothing(fwd, bwd)
    q, k, v, s0, decay = ins
    assert _forward_split(q.detach(), k.detach(), v.detach(), decay)[0] > 1, "eager would keep segment states here"

    def run_ref(dt):
        rq, rk, rv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        rs0 = s0.detach().clone().requires_grad_()
        ro, rf = ref.attention_ref(rq, rk, rv, decay, None, rs0, compute_dtype=dt)
        return ro, rf, torch.autograd.grad([ro, rf], [rq, rk, rv, rs0], [c.to(dt) for c in cot])

    ro, rf, rg = run_ref(torch.float64)
    lo, lf, lg = run_ref(torch.bfloat16)
    assert_close_to_ref("o", outs[0], ro, torch.bfloat16, lo)
    assert_close_to_ref("final_state", outs[1], rf, torch.bfloat16, lf)
    for name, a, r, lp in zip(["dq", "dk", "dv", "d_initial_state"], gr, rg, lg):
        assert_close_to_ref(name, a, r, torch.bfloat16, lp)
