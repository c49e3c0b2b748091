"""Dispatcher registration: torch.library.opcheck on the ops, and torch.compile(fullgraph=True).

opcheck runs all of its default checks (test_schema, test_autograd_registration,
test_faketensor, test_aot_dispatch_dynamic); none is excluded. test_autograd_registration is
applicable: lasp_attention is differentiable and registers its C++ autograd function under the
Autograd key, which is exactly what that check verifies when inputs require grad. For the internal
lasp_attention_fwd / lasp_attention_bwd ops (no autograd formula of their own) we call opcheck
with inputs that do not require grad, where the check is a no-op by design.
"""

import zlib

import pytest
import torch
from torch.library import opcheck

from conftest import (
    DEVICES,
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
    o, f, state_in = torch.ops.lasp.lasp_attention_fwd(*fwd_args)
    g = gen(seed + 1)
    do = randn(o.shape, g, torch.float32, device)
    dS = randn(f.shape, g, torch.float32, device)
    bwd_args = (q, k, v, do, dS, decay, 0.7, state_in.clone(), None)
    opcheck(torch.ops.lasp.lasp_attention_bwd, bwd_args)
    opcheck(torch.ops.lasp.lasp_attention_bwd, (q, k, v, do, None, None, 0.7, state_in.clone(), None))


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_bwd_ops_match_reference(lasp, device, seed):
    """The internal ops compute what their names say (so opcheck is not checking a no-op)."""
    B, H, Hkv, N, D, E = 1, 4, 2, 13, 4, 6
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    decay = make_decay("alibi", H, device)
    o, f, state_in = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, s0, None)
    assert torch.equal(state_in, s0), "without a group, state_in is the initial state"
    rq, rk, rv, rs0 = (t.double().requires_grad_() for t in (q, k, v, s0))
    ro, rf = ref.attention_ref(rq, rk, rv, decay, 0.7, rs0)
    assert_close_to_ref("o", o, ro, torch.float32)
    assert_close_to_ref("final_state", f, rf, torch.float32)
    g = gen(seed + 1)
    do, dS = randn(o.shape, g, torch.float32, device), randn(f.shape, g, torch.float32, device)
    dq, dk, dv, ds0 = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, 0.7, state_in, None)
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
    o, f, state_in = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, None, None)
    assert state_in.numel() == 0 and state_in.dtype == torch.float32
    zeros = torch.zeros(B, H, D, E, dtype=torch.float32, device=device)
    o0, f0, _ = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, 0.7, zeros, None)
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
