"""lasp.lasp_attention (group=None) against the fp64 reference: outputs, every gradient,
layouts, strides, dtypes, GQA/MQA, decay, states, gradcheck, validation errors, alibi_slopes.

Tolerances (conftest): float32 rel err < 1e-4, float64 < 1e-10, float16/bfloat16 at most 2x the
error of the reference run in that dtype plus a one-ulp-ish floor.
"""

import math
import os
import re
import zlib

import pytest
import torch

from conftest import (
    DEVICES,
    DTYPE_IDS,
    HAS_CUDA,
    NO_CUDA_REASON,
    acc_dtype,
    alibi_slopes_expected,
    assert_close_to_ref,
    gen,
    grads,
    make_decay,
    make_qkv,
    make_state,
    poison_allocator,
    randn,
    ref,
    rel_err,
)

LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture
def seed(request):
    """A different, reproducible seed for every test (and every parametrization)."""
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)


def _dtype_param(dtype):
    return pytest.param(dtype, id=DTYPE_IDS[dtype])


DTYPES = [_dtype_param(d) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]


def _skip_fp64_on_cuda(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU dtype of the op (for gradcheck)")


def check_against_reference(
    lasp,
    q,
    k,
    v,
    decay,
    s0,
    *,
    dtype,
    layout="bhnd",
    scale=None,
    final_grad=True,
    seed=0,
    grad_inputs=None,
    recurrent64=False,
):
    """Run the op and the references on the same (rounded) inputs; compare o, final_state and
    the gradients with respect to ``grad_inputs`` (default q, k, v, s0) for a random cotangent on
    o and (if final_grad) on final_state. Returns the op's (o, final_state).

    The float64 truth is the masked sum with autograd, or with ``recurrent64`` the token-by-token
    recurrence run forward and backward by hand (reference.attention_recurrent_grads). The
    low-precision reference of the tolerance rule is the masked sum in the op's dtype."""
    device = q.device
    grad_inputs = list(grad_inputs) if grad_inputs is not None else [q, k, v, s0]
    before = [t.detach().clone() for t in (q, k, v) + ((s0,) if s0 is not None else ())]

    poison_allocator(device)
    o, f = lasp.lasp_attention(
        q, k, v, decay, scale=scale, initial_state=s0, output_final_state=True, layout=layout
    )
    B = q.shape[0]
    if layout == "bhnd":
        H, N, D = q.shape[1], q.shape[2], q.shape[3]
        E = v.shape[3]
        exp_o = (B, H, N, E)
    else:
        N, H, D = q.shape[1], q.shape[2], q.shape[3]
        E = v.shape[3]
        exp_o = (B, N, H, E)
    assert tuple(o.shape) == exp_o, f"o shape {tuple(o.shape)} != {exp_o}"
    assert tuple(f.shape) == (B, H, D, E), f"final_state shape {tuple(f.shape)}"
    assert o.dtype == dtype, f"o dtype {o.dtype} != input dtype {dtype}"
    assert f.dtype == acc_dtype(dtype), f"final_state dtype {f.dtype} != {acc_dtype(dtype)}"
    assert o.device == q.device and f.device == q.device

    g = gen(seed + 1)
    do = randn(o.shape, g, dtype, device)
    dS = randn(f.shape, g, f.dtype, device) if final_grad else None
    op_grads = grads([o, f], grad_inputs, [do, dS])

    # fp64 reference on the very same values.
    def leafify(t, dt):
        return None if t is None else t.detach().to(dt).requires_grad_(t.requires_grad)

    def run_ref(compute_dtype):
        rq, rk, rv = (leafify(t, compute_dtype) for t in (q, k, v))
        rs0 = None if s0 is None else s0.detach().clone().requires_grad_(s0.requires_grad)
        ro, rf = ref.attention_ref(rq, rk, rv, decay, scale, rs0, layout, compute_dtype=compute_dtype)
        mapping = {id(q): rq, id(k): rk, id(v): rv}
        if s0 is not None:
            mapping[id(s0)] = rs0
        rin = [None if t is None else mapping.get(id(t)) for t in grad_inputs]
        rg = grads(
            [ro, rf],
            rin,
            [do.to(compute_dtype), None if dS is None else dS.to(compute_dtype)],
        )
        return ro, rf, rg

    if recurrent64:
        r = ref.attention_recurrent_grads(
            q.detach(), k.detach(), v.detach(), decay, scale, None if s0 is None else s0.detach(), do, dS, layout
        )
        ro, rf = r["o"], r["final_state"]
        by_id = {id(q): r["dq"], id(k): r["dk"], id(v): r["dv"]}
        if s0 is not None:
            by_id[id(s0)] = r["d_initial_state"]
        assert all(t is None or id(t) in by_id for t in grad_inputs), "recurrent64: gradients of q, k, v, s0 only"
        rg = [None if t is None else by_id[id(t)] for t in grad_inputs]
    else:
        ro, rf, rg = run_ref(torch.float64)
    lo = lf = None
    lg = [None] * len(grad_inputs)
    if dtype in LOWP:
        lo, lf, lg = run_ref(dtype)

    assert_close_to_ref("o", o, ro, dtype, lo)
    assert_close_to_ref("final_state", f, rf, dtype, lf)
    names = ["dq", "dk", "dv", "d_initial_state"] if len(grad_inputs) == 4 else [f"grad{i}" for i in range(len(grad_inputs))]
    for name, t, a, r, lp in zip(names, grad_inputs, op_grads, rg, lg):
        if t is None or not t.requires_grad:
            continue
        if a is None:
            # No dependence at all is only right when the reference gradient is zero too.
            assert r is None or torch.count_nonzero(r) == 0, f"{name}: op gave no gradient"
            continue
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype} != {t.dtype}"
        assert_close_to_ref(name, a, r, dtype, lp)

    after = [t.detach() for t in (q, k, v) + ((s0,) if s0 is not None else ())]
    for b, a in zip(before, after):
        assert torch.equal(a, b), "the op modified one of its inputs"
    return o, f


# ----------------------------------------------------------------------------------------------
# The main grid: dtypes x lengths around the chunk size x head configurations x decay x state.

HEADS = [pytest.param(4, 4, id="mha"), pytest.param(4, 2, id="gqa"), pytest.param(4, 1, id="mqa")]
DECAYS = [pytest.param(None, id="nodecay"), pytest.param("alibi", id="alibi"), pytest.param("strong", id="strong")]


@pytest.mark.parametrize("with_state", [pytest.param(False, id="nostate"), pytest.param(True, id="state")])
@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("N", [1, 63, 64, 65])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_backward(lasp, device, dtype, N, H, Hkv, decay_kind, with_state, seed):
    _skip_fp64_on_cuda(device, dtype)
    B, D, E = 2, 32, 48
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed) if with_state else None
    decay = make_decay(decay_kind, H, device)
    check_against_reference(
        lasp, q, k, v, decay, s0, dtype=dtype, final_grad=with_state, seed=seed
    )


LONG_CASES = [
    # dtype, H, Hkv, decay, state, layout
    (torch.float32, 4, 2, "alibi", True, "bhnd"),
    (torch.float32, 2, 2, None, True, "bhnd"),
    (torch.bfloat16, 2, 2, None, False, "bnhd"),
    (torch.float16, 4, 1, "alibi", True, "bhnd"),
    (torch.float64, 2, 1, "strong", True, "bnhd"),
]


@pytest.mark.parametrize(
    "case", LONG_CASES, ids=[f"{DTYPE_IDS[c[0]]}-h{c[1]}kv{c[2]}-{c[3]}-{c[5]}" for c in LONG_CASES]
)
@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence(lasp, device, case, seed):
    dtype, H, Hkv, decay_kind, with_state, layout = case
    _skip_fp64_on_cuda(device, dtype)
    B, N, D, E = 1, 1000, 32, 48
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device=device, seed=seed, layout=layout)
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed) if with_state else None
    check_against_reference(
        lasp, q, k, v, make_decay(decay_kind, H, device), s0,
        dtype=dtype, layout=layout, final_grad=with_state, seed=seed,
    )


@pytest.mark.parametrize("D,E", [(16, 16), (48, 32), (1, 5), (64, 128)])
@pytest.mark.parametrize("device", DEVICES)
def test_head_dims(lasp, device, D, E, seed):
    B, H, Hkv, N = 2, 2, 1, 70
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed)
    check_against_reference(lasp, q, k, v, make_decay("alibi", H, device), s0, dtype=torch.float32, seed=seed)


# ----------------------------------------------------------------------------------------------
# Every head dim from 1 to 256, as D and as E, against the float64 token-by-token recurrence.
#
# E = 97 D mod 257 is a permutation of 1..256 (257 is prime), so across the sweep every value occurs
# once as D and once as E: primes, odd dims, and non-multiples of 16 / 32 / 64 beside the tensor-core
# dims. The CUDA kernels work on column tiles of E (and row tiles of D) whose last one is partial for
# most of these; several chunks and several segments per head make the carried state matter.


def _sweep_dims():
    return [(d, (97 * d) % 257) for d in range(1, 257)]


# Equal and tensor-core-adjacent pairs the permutation does not produce.
HEAD_DIM_PAIRS = [(96, 96), (80, 80), (112, 112), (160, 160), (192, 192), (256, 256), (128, 96), (96, 128),
                  (64, 80), (128, 192), (256, 64), (32, 160), (200, 17), (251, 241)]
SWEEP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sweep_case(lasp, D, E, seed, *, device, dtype, B, H, Hkv, N, layout):
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device=device, seed=seed, layout=layout)
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed)
    decay = make_decay("alibi", H, device)
    check_against_reference(lasp, q, k, v, decay, s0, dtype=dtype, layout=layout, seed=seed, recurrent64=True)


@pytest.mark.parametrize("D,E", _sweep_dims() + HEAD_DIM_PAIRS, ids=lambda x: str(x))
@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_sweep(lasp, device, D, E, seed):
    """One (D, E) per test, the dtype and layout cycling with it: B = 1, H = 2 (one kv head), N = 200
    (on CUDA several segments per head; on the CPU four chunks)."""
    i = D + E
    dtype = SWEEP_DTYPES[i % 3]
    layout = ("bhnd", "bnhd")[(i // 3) % 2]
    _sweep_case(lasp, D, E, seed, device=device, dtype=dtype, B=1, H=2, Hkv=1, N=200, layout=layout)


WIDE_DIMS = [(17, 96), (96, 96), (80, 200), (160, 160), (255, 33), (112, 256), (192, 80), (256, 144),
             (64, 96), (128, 160), (33, 63), (129, 129)]


@pytest.mark.parametrize("dtype", [_dtype_param(d) for d in SWEEP_DTYPES])
@pytest.mark.parametrize("D,E", WIDE_DIMS, ids=lambda x: str(x))
@pytest.mark.parametrize("device", [d for d in DEVICES if d.values[0] == "cuda"])
def test_head_dim_sweep_many_heads(lasp, device, D, E, dtype, seed):
    """Enough heads (B = 2, H = 48, Hkv = 16) that the CUDA plan cuts each sequence in one or two
    segments of several chunks each: the carried state crosses many chunk boundaries in one block."""
    _sweep_case(lasp, D, E, seed, device=device, dtype=dtype, B=2, H=48, Hkv=16, N=260, layout="bhnd")


# Multiples of 8 up to 128 in bf16 / fp16: the mma.sync kernels padded to {64, 128} inside (zero-filled
# loads, masked stores). D = 8 i with E = 8 (5 i mod 17) pairs each multiple once as D and once as E, on
# both sides of 64; several segments per head and GQA.
TC_PADDED_DIMS = [(8 * i, 8 * ((5 * i) % 17)) for i in range(1, 17)]
# Above 128: blocks of D and E (at most 128 each) on the same kernels, o / dq / dk / dv summed in fp32.
TC_PADDED_DIMS += [(256, 256), (192, 192), (136, 64), (64, 136), (256, 8), (24, 256), (200, 160), (160, 248),
                   (128, 256), (256, 128), (248, 96)]


@pytest.mark.parametrize("D,E", TC_PADDED_DIMS, ids=lambda x: str(x))
@pytest.mark.parametrize("device", [d for d in DEVICES if d.values[0] == "cuda"])
def test_head_dim_padded_tensor_cores(lasp, device, D, E, seed):
    i = D // 8 + E // 8
    dtype = (torch.bfloat16, torch.float16)[i % 2]
    layout = ("bhnd", "bnhd")[(i // 2) % 2]
    _sweep_case(lasp, D, E, seed, device=device, dtype=dtype, B=2, H=12, Hkv=4, N=333, layout=layout)


# ----------------------------------------------------------------------------------------------
# Layouts and strides


@pytest.mark.parametrize("N", [1, 65])
@pytest.mark.parametrize("dtype", [_dtype_param(torch.float32), _dtype_param(torch.bfloat16), _dtype_param(torch.float64)])
@pytest.mark.parametrize("device", DEVICES)
def test_layout_bnhd(lasp, device, dtype, N, seed):
    _skip_fp64_on_cuda(device, dtype)
    B, H, Hkv, D, E = 2, 4, 2, 32, 48
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device=device, seed=seed, layout="bnhd")
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed)
    decay = make_decay("alibi", H, device)
    o, f = check_against_reference(lasp, q, k, v, decay, s0, dtype=dtype, layout="bnhd", seed=seed)
    assert o.shape == (B, N, H, E)
    # The same memory seen as (B, H, N, D) strided views with layout="bhnd" is the same problem:
    # a strides-only implementation gives the same numbers.
    o2, f2 = lasp.lasp_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), decay,
        initial_state=s0, output_final_state=True, layout="bhnd",
    )
    assert o2.shape == (B, H, N, E)
    torch.testing.assert_close(o2.transpose(1, 2), o, rtol=0, atol=0)
    torch.testing.assert_close(f2, f, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [_dtype_param(torch.float32), _dtype_param(torch.bfloat16)])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(lasp, device, dtype, layout, seed):
    B, H, Hkv, N, D, E = 2, 4, 2, 67, 16, 24
    g = gen(seed)
    # Bases in the "other" memory order, so that the views handed to the op are non-contiguous
    # in three different ways: a slice of the last dim, a transposed view, a stride-2 slice of N.
    if layout == "bhnd":
        qb = randn((B, H, N, 2 * D), g, dtype, device)        # q = qb[..., :D]
        kb = randn((B, N, Hkv, D), g, dtype, device)          # k = kb.transpose(1, 2)
        vb = randn((B, Hkv, 2 * N, E), g, dtype, device)      # v = vb[:, :, ::2]
        for t in (qb, kb, vb):
            t.requires_grad_(True)
        q, k, v = qb[..., :D], kb.transpose(1, 2), vb[:, :, ::2]
    else:
        qb = randn((B, N, H, 2 * D), g, dtype, device)
        kb = randn((B, Hkv, N, D), g, dtype, device)
        vb = randn((B, 2 * N, Hkv, E), g, dtype, device)
        for t in (qb, kb, vb):
            t.requires_grad_(True)
        q, k, v = qb[..., :D], kb.transpose(1, 2), vb[:, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    decay = make_decay("mixed", 2 * H, device, g=g)[::2]  # non-contiguous decay too
    assert not decay.is_contiguous()
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed)
    o, f = check_against_reference(
        lasp, q, k, v, decay, s0, dtype=dtype, layout=layout, seed=seed
    )
    # Same numbers as the op on contiguous copies.
    o2, f2 = lasp.lasp_attention(
        q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous(), decay.contiguous(),
        initial_state=s0.detach(), output_final_state=True, layout=layout,
    )
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(o, o2) < tol
    assert rel_err(f, f2) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_initial_state(lasp, device, seed):
    B, H, Hkv, N, D, E = 2, 2, 2, 33, 8, 12
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed)
    base = make_state(B, H, E, D, dtype=torch.float32, device=device, seed=seed)
    s0 = base.transpose(-1, -2)  # (B, H, D, E) view, not contiguous
    assert not s0.is_contiguous()
    check_against_reference(
        lasp, q, k, v, make_decay("alibi", H, device), s0, dtype=torch.float32, seed=seed,
        grad_inputs=[q, k, v, s0],
    )


# ----------------------------------------------------------------------------------------------
# Arguments: scale, decay, output_final_state, initial_state


@pytest.mark.parametrize("scale", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale(lasp, device, scale, seed):
    B, H, Hkv, N, D, E = 1, 2, 1, 40, 16, 8
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed)
    check_against_reference(
        lasp, q, k, v, make_decay("alibi", H, device), s0, dtype=torch.float32, scale=scale, seed=seed
    )


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale(lasp, device, seed):
    B, H, Hkv, N, D, E = 1, 2, 2, 20, 9, 4
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float64 if device == "cpu" else torch.float32,
                       device=device, seed=seed, requires_grad=False)
    o_default = lasp.lasp_attention(q, k, v)
    o_explicit = lasp.lasp_attention(q, k, v, scale=1.0 / math.sqrt(D))
    o_one = lasp.lasp_attention(q, k, v, scale=1.0)
    assert rel_err(o_default, o_explicit) < 1e-6
    assert rel_err(o_one, o_explicit) > 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_zero_decay_equals_no_decay(lasp, device, seed):
    B, H, Hkv, N, D, E = 2, 4, 2, 50, 8, 8
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    o_none = lasp.lasp_attention(q, k, v, None)
    o_zero = lasp.lasp_attention(q, k, v, torch.zeros(H, device=device))
    o_some = lasp.lasp_attention(q, k, v, make_decay("alibi", H, device))
    assert rel_err(o_zero, o_none) < 1e-6
    assert rel_err(o_some, o_none) > 1e-2  # decay does something


@pytest.mark.parametrize("decay_dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_decay_other_float_dtypes(lasp, device, decay_dtype, seed):
    """A decay tensor of another float dtype is accepted; its values are used as given."""
    B, H, Hkv, N, D, E = 1, 4, 2, 30, 8, 8
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed)
    decay = make_decay("alibi", H, device).to(decay_dtype)
    check_against_reference(lasp, q, k, v, decay, None, dtype=torch.float32, seed=seed, final_grad=False)


@pytest.mark.parametrize("device", DEVICES)
def test_output_final_state_false_returns_only_o(lasp, device, seed):
    B, H, Hkv, N, D, E = 2, 4, 2, 37, 8, 12
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed)
    decay = make_decay("alibi", H, device)
    o = lasp.lasp_attention(q, k, v, decay, initial_state=s0)
    assert isinstance(o, torch.Tensor), f"expected a Tensor, got {type(o)}"
    o2, f2 = lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True)
    assert torch.equal(o, o2)
    do = randn(o.shape, gen(seed), torch.float32, device)
    g1 = torch.autograd.grad(o, [q, k, v, s0], do)
    ro, _ = ref.attention_ref(*(t.detach().double().requires_grad_() for t in (q, k, v)), decay, None,
                              s0.detach().double())
    assert_close_to_ref("o", o, ro, torch.float32)
    g2 = torch.autograd.grad(o2, [q, k, v, s0], do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decay_kind", [None, "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_final_state_only(lasp, device, decay_kind, seed):
    """Loss on final_state alone: dq must be zero, dk/dv/d_initial_state exact."""
    B, H, Hkv, N, D, E = 2, 4, 1, 45, 8, 12
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed)
    decay = make_decay(decay_kind, H, device, g=gen(seed))
    o, f = lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True)
    dS = randn(f.shape, gen(seed + 3), torch.float32, device)
    dq, dk, dv, ds0 = torch.autograd.grad(f, [q, k, v, s0], dS, allow_unused=True)
    assert dq is None or torch.count_nonzero(dq) == 0, "final_state does not depend on q"
    rq, rk, rv, rs0 = (t.detach().double().requires_grad_() for t in (q, k, v, s0))
    _, rf = ref.attention_ref(rq, rk, rv, decay, None, rs0)
    rdk, rdv, rds0 = torch.autograd.grad(rf, [rk, rv, rs0], dS.double())
    assert_close_to_ref("final_state", f, rf, torch.float32)
    assert_close_to_ref("dk", dk, rdk, torch.float32)
    assert_close_to_ref("dv", dv, rdv, torch.float32)
    assert_close_to_ref("d_initial_state", ds0, rds0, torch.float32)


@pytest.mark.parametrize("split", [1, 37, 64, 100])
@pytest.mark.parametrize("dtype", [_dtype_param(torch.float32), _dtype_param(torch.float64)])
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill(lasp, device, dtype, split, seed):
    """Two calls carrying final_state -> initial_state equal one call, values and gradients."""
    _skip_fp64_on_cuda(device, dtype)
    B, H, Hkv, N, D, E = 2, 4, 2, 129, 16, 24
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=dtype, device=device, seed=seed)
    decay = make_decay("alibi", H, device)
    o, f = lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True)
    o1, f1 = lasp.lasp_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], decay,
                                 initial_state=s0, output_final_state=True)
    o2, f2 = lasp.lasp_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], decay,
                                 initial_state=f1, output_final_state=True)
    oc = torch.cat([o1, o2], dim=2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(oc, o) < tol
    assert rel_err(f2, f) < tol
    g = gen(seed + 1)
    do, dS = randn(o.shape, g, dtype, device), randn(f.shape, g, f.dtype, device)
    ga = torch.autograd.grad([o, f], [q, k, v, s0], [do, dS])
    gb = torch.autograd.grad([oc, f2], [q, k, v, s0], [do, dS])
    for name, a, b in zip(["dq", "dk", "dv", "d_initial_state"], ga, gb):
        assert rel_err(b, a) < tol, name
    # ...and both agree with the reference.
    ro, rf = ref.attention_ref(q, k, v, decay, None, s0)
    assert_close_to_ref("o (two calls)", oc, ro, dtype)
    assert_close_to_ref("final_state (two calls)", f2, rf, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_initial_state_without_grad(lasp, device, seed):
    B, H, Hkv, N, D, E = 1, 2, 1, 21, 8, 8
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    check_against_reference(lasp, q, k, v, make_decay("alibi", H, device), s0, dtype=torch.float32, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_without_grad(lasp, device, seed):
    """Inference: nothing requires grad; output has no grad_fn."""
    B, H, Hkv, N, D, E = 1, 2, 2, 21, 8, 8
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float32, device=device, seed=seed, requires_grad=False)
    o, f = lasp.lasp_attention(q, k, v, output_final_state=True)
    assert not o.requires_grad and not f.requires_grad
    ro, rf = ref.attention_ref(q, k, v)
    assert_close_to_ref("o", o, ro, torch.float32)
    assert_close_to_ref("final_state", f, rf, torch.float32)
    with torch.no_grad():
        q.requires_grad_(True)
        o2 = lasp.lasp_attention(q, k, v)
    assert not o2.requires_grad
    assert torch.equal(o2, o)


# ----------------------------------------------------------------------------------------------
# gradcheck (float64, CPU)


@pytest.mark.parametrize(
    "N,H,Hkv,decay_kind,layout",
    [
        (1, 2, 1, "mixed", "bhnd"),
        (5, 2, 1, "mixed", "bhnd"),
        (7, 2, 2, None, "bnhd"),
        (9, 4, 2, "alibi", "bhnd"),
        (8, 2, 1, "strong", "bnhd"),
    ],
)
def test_gradcheck(lasp, N, H, Hkv, decay_kind, layout, seed):
    B, D, E = 2, 3, 4
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=torch.float64, device="cpu", seed=seed, layout=layout)
    s0 = make_state(B, H, D, E, dtype=torch.float64, device="cpu", seed=seed)
    decay = make_decay(decay_kind, H, g=gen(seed))

    def fn(q, k, v, s0):
        return lasp.lasp_attention(q, k, v, decay, scale=0.8, initial_state=s0,
                                   output_final_state=True, layout=layout)

    assert torch.autograd.gradcheck(fn, (q, k, v, s0), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Empty sequence


_EMPTY_PROBE = {}


def _empty_sequence_survives(device):
    """N = 0 once in a child process first: if it crashes the interpreter (it segfaulted on CUDA),
    fail this test alone instead of killing the whole pytest run."""
    if device == "cpu":
        return
    if device not in _EMPTY_PROBE:
        import subprocess
        import sys

        code = (
            "import torch, lasp\n"
            f"d = '{device}'\n"
            "q = torch.randn(2, 4, 0, 8, device=d); k = torch.randn(2, 2, 0, 8, device=d)\n"
            "v = torch.randn(2, 2, 0, 6, device=d)\n"
            "o = lasp.lasp_attention(q, k, v, output_final_state=True)\n"
            "torch.cuda.synchronize()\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        _EMPTY_PROBE[device] = (r.returncode, r.stderr[-2000:])
    rc, err = _EMPTY_PROBE[device]
    if rc != 0:
        pytest.fail(f"lasp_attention with N=0 on {device} killed the process (exit code {rc}):\n{err}")


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence(lasp, device, layout, seed):
    _empty_sequence_survives(device)
    B, H, Hkv, D, E = 2, 4, 2, 8, 6
    q, k, v = make_qkv(B, H, Hkv, 0, D, E, dtype=torch.float32, device=device, seed=seed, layout=layout)
    decay = make_decay("alibi", H, device)
    o = lasp.lasp_attention(q, k, v, decay, layout=layout)
    assert o.shape == ((B, H, 0, E) if layout == "bhnd" else (B, 0, H, E))
    assert o.dtype == torch.float32
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed)
    o, f = lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True, layout=layout)
    assert o.numel() == 0
    assert torch.equal(f, s0.detach()), "final_state of an empty sequence is gamma^0 S0 = S0"
    _, f0 = lasp.lasp_attention(q, k, v, decay, output_final_state=True, layout=layout)
    assert f0.shape == (B, H, D, E) and torch.count_nonzero(f0) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence_backward(lasp, device, seed):
    _empty_sequence_survives(device)
    B, H, Hkv, D, E = 1, 2, 1, 4, 5
    q, k, v = make_qkv(B, H, Hkv, 0, D, E, dtype=torch.float32, device=device, seed=seed)
    s0 = make_state(B, H, D, E, dtype=torch.float32, device=device, seed=seed)
    o, f = lasp.lasp_attention(q, k, v, make_decay("alibi", H, device), initial_state=s0, output_final_state=True)
    dS = randn(f.shape, gen(seed), torch.float32, device)
    ds0, = torch.autograd.grad([o.sum() + (f * dS).sum()], [s0])
    assert torch.equal(ds0, dS)


# ----------------------------------------------------------------------------------------------
# Validation errors


def _valid(device="cpu", dtype=torch.float32):
    g = gen(123)
    B, H, Hkv, N, D, E = 2, 4, 2, 10, 8, 6
    q = randn((B, H, N, D), g, dtype, device)
    k = randn((B, Hkv, N, D), g, dtype, device)
    v = randn((B, Hkv, N, E), g, dtype, device)
    return q, k, v


def _call(lasp, q, k, v, decay=None, **kw):
    return lasp.lasp_attention(q, k, v, decay, **kw)


def _bad_cases():
    """(id, builder -> (args, kwargs), regex of the argument the message must name)."""
    F = torch.float32

    def case(fn):
        return fn

    cases = []

    def add(name, pattern, fn):
        cases.append(pytest.param(fn, pattern, id=name))

    add("q_3d", r"\bq\b", lambda q, k, v: ((q[0], k, v), {}))
    add("k_5d", r"\bk\b", lambda q, k, v: ((q, k[None], v), {}))
    add("v_2d", r"\bv\b", lambda q, k, v: ((q, k, v[0, 0]), {}))
    add("k_batch", r"\bk\b", lambda q, k, v: ((q, k[:1], v), {}))
    add("v_batch", r"\bv\b", lambda q, k, v: ((q, k, v[:1]), {}))
    add("k_len", r"\bk\b", lambda q, k, v: ((q, k[:, :, :9], v), {}))
    add("v_len", r"\bv\b", lambda q, k, v: ((q, k, v[:, :, :9]), {}))
    add("k_headdim", r"\bk\b", lambda q, k, v: ((q, k[..., :7], v), {}))
    # 3 v heads against 4 q heads: neither divides the other (head maps, lasp_params.h)
    add("v_heads", r"\bv\b", lambda q, k, v: ((q, k, torch.cat([v, v[:, :1]], 1)), {}))
    add("heads_not_divisible", r"\b(k|Hkv|heads?)\b", lambda q, k, v: ((q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)), {}))
    add("decay_shape", r"\bdecay\b", lambda q, k, v: ((q, k, v, torch.full((5,), 0.1)), {}))
    add("decay_2d", r"\bdecay\b", lambda q, k, v: ((q, k, v, torch.full((2, 4), 0.1)), {}))
    add("decay_negative", r"\bdecay\[1\] = -0\.2\b", lambda q, k, v: ((q, k, v, torch.tensor([0.1, -0.2, 0.3, 0.0])), {}))
    add("decay_int", r"\bdecay\b", lambda q, k, v: ((q, k, v, torch.ones(4, dtype=torch.int64)), {}))
    add("decay_requires_grad", r"\bdecay\b", lambda q, k, v: ((q, k, v, torch.full((4,), 0.1, requires_grad=True)), {}))
    add("int_dtype", r"\b(q|dtype)\b", lambda q, k, v: ((q.to(torch.int32), k.to(torch.int32), v.to(torch.int32)), {}))
    add("qk_dtype_differ", r"\b(k|dtype)\b", lambda q, k, v: ((q, k.to(torch.float64), v), {}))
    add("qv_dtype_differ", r"\b(v|dtype)\b", lambda q, k, v: ((q, k, v.to(torch.bfloat16)), {}))
    add("state_shape", r"\binitial_state\b", lambda q, k, v: ((q, k, v), {"initial_state": torch.zeros(2, 4, 6, 8)}))
    add("state_batch", r"\binitial_state\b", lambda q, k, v: ((q, k, v), {"initial_state": torch.zeros(1, 4, 8, 6)}))
    add("state_dtype_half", r"\binitial_state\b", lambda q, k, v: ((q, k, v), {"initial_state": torch.zeros(2, 4, 8, 6, dtype=torch.float16)}))
    add("state_dtype_double", r"\binitial_state\b", lambda q, k, v: ((q, k, v), {"initial_state": torch.zeros(2, 4, 8, 6, dtype=torch.float64)}))
    add("state_dtype_for_bf16", r"\binitial_state\b", lambda q, k, v: ((q.bfloat16(), k.bfloat16(), v.bfloat16()), {"initial_state": torch.zeros(2, 4, 8, 6, dtype=torch.bfloat16)}))
    add("layout_unknown", r"\blayout\b", lambda q, k, v: ((q, k, v), {"layout": "bnd"}))
    add("scale_str", r"\bscale\b", lambda q, k, v: ((q, k, v), {"scale": "a"}))
    add("decay_list", r"\bdecay\b", lambda q, k, v: ((q, k, v, [0.1, 0.2, 0.3, 0.4]), {}))
    add("state_list", r"\binitial_state\b", lambda q, k, v: ((q, k, v), {"initial_state": [0.0]}))
    add("scale_tensor", r"\bscale\b", lambda q, k, v: ((q, k, v), {"scale": torch.ones(2)}))
    add("layout_bnhd_mismatch", r"\b(k|v)\b", lambda q, k, v: ((q, k, v), {"layout": "bnhd"}))
    return cases


@pytest.mark.parametrize("build,pattern", _bad_cases())
def test_validation_errors(lasp, build, pattern):
    import re

    q, k, v = _valid()
    args, kw = build(q, k, v)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as ei:
        _call(lasp, *args, **kw)
    msg = str(ei.value)
    assert msg.startswith("lasp_attention: "), f"message does not start with 'lasp_attention: ': {msg!r}"
    first = msg.splitlines()[0]
    assert re.search(pattern, first), f"message does not name the argument ({pattern}): {first!r}"


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("which", ["k", "v", "decay", "initial_state"])
def test_mixed_devices(lasp, which):
    import re

    q, k, v = _valid("cuda")
    decay = torch.full((4,), 0.1, device="cuda")
    s0 = torch.zeros(2, 4, 8, 6, device="cuda")
    if which == "k":
        k = k.cpu()
    elif which == "v":
        v = v.cpu()
    elif which == "decay":
        decay = decay.cpu()
    else:
        s0 = s0.cpu()
    with pytest.raises((RuntimeError, ValueError, TypeError)) as ei:
        lasp.lasp_attention(q, k, v, decay, initial_state=s0)
    msg = str(ei.value)
    assert msg.startswith("lasp_attention: ")
    assert re.search(rf"\b{which}\b", msg.splitlines()[0])


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_cuda_decay_values(lasp):
    """A negative rate raises on CUDA too, also after the same tensor was read valid (the op reads a decay
    tensor's values once per in-place version) and then changed in place (a NaN rate propagates instead:
    test_reliability)."""
    q, k, v = _valid("cuda")
    decay = torch.full((4,), 0.1, device="cuda")
    o = lasp.lasp_attention(q, k, v, decay)
    assert torch.isfinite(o).all()
    for bad in (-0.2, -float("inf")):
        decay[1] = bad  # in place: a new version of a tensor read before
        with pytest.raises(ValueError, match=r"^lasp_attention: decay must hold rates >= 0"):
            lasp.lasp_attention(q, k, v, decay)
        with pytest.raises(ValueError, match=r"^lasp_attention: decay must hold rates >= 0"):
            lasp.lasp_attention(q, k, v, torch.tensor([0.1, bad, 0.3, 0.0], device="cuda"))
    decay[1] = 0.0
    torch.testing.assert_close(lasp.lasp_attention(q, k, v, decay.clone().fill_(0.1)), o)


def test_valid_call_for_validation_inputs(lasp):
    """The base inputs of the validation tests are themselves valid (so each error is specific)."""
    q, k, v = _valid()
    o = _call(lasp, q, k, v, torch.full((4,), 0.1), initial_state=torch.zeros(2, 4, 8, 6))
    assert o.shape == (2, 4, 10, 6)
    o = _call(lasp, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bnhd")
    assert o.shape == (2, 10, 4, 6)


# ----------------------------------------------------------------------------------------------
# alibi_slopes


@pytest.mark.parametrize("H", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32, 40, 64])
def test_alibi_slopes(lasp, H):
    s = lasp.alibi_slopes(H)
    assert isinstance(s, torch.Tensor)
    assert s.dtype == torch.float32 and s.shape == (H,)
    expected = torch.tensor(alibi_slopes_expected(H), dtype=torch.float64)
    assert torch.allclose(s.double(), expected, rtol=1e-6, atol=0), f"{s.tolist()} vs {expected.tolist()}"
    if H & (H - 1) == 0:
        direct = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], dtype=torch.float64)
        assert torch.allclose(s.double(), direct, rtol=1e-6, atol=0)
    assert (s > 0).all() and (s < 1).all()


def test_alibi_slopes_known_values(lasp):
    # Spot values of the standard construction.
    assert torch.allclose(lasp.alibi_slopes(8).double(), torch.tensor([2.0**-i for i in range(1, 9)], dtype=torch.float64))
    s6 = lasp.alibi_slopes(6).double()
    # closest power of 2 is 4: [2^-2, 2^-4, 2^-6, 2^-8], then from H=8 the even-indexed [2^-1, 2^-3]
    assert torch.allclose(s6, torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# CUDA only: long sequences with few (b, h) pairs, so the kernels split each sequence into
# segments (docs/design.md: the in-device version of the ring), and the tiled fast paths (E in 64..128).

CUDA_LONG = [
    # dtype, H, Hkv, N, D, E, decay, state
    (torch.bfloat16, 2, 1, 4096, 128, 128, "alibi", True),
    (torch.float16, 2, 2, 3001, 64, 128, None, True),
    (torch.float32, 1, 1, 4099, 128, 64, "alibi", True),
    (torch.bfloat16, 4, 2, 2113, 64, 64, "strong", False),
    (torch.float32, 2, 1, 2048, 32, 48, "mixed", True),
]


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize(
    "case", CUDA_LONG, ids=[f"{DTYPE_IDS[c[0]]}-h{c[1]}kv{c[2]}-n{c[3]}-d{c[4]}e{c[5]}-{c[6]}" for c in CUDA_LONG]
)
def test_cuda_long_segmented(lasp, case, seed):
    dtype, H, Hkv, N, D, E, decay_kind, with_state = case
    B = 1
    q, k, v = make_qkv(B, H, Hkv, N, D, E, dtype=dtype, device="cuda", seed=seed)
    s0 = make_state(B, H, D, E, dtype=dtype, device="cuda", seed=seed) if with_state else None
    check_against_reference(
        lasp, q, k, v, make_decay(decay_kind, H, "cuda", g=gen(seed)), s0,
        dtype=dtype, final_grad=with_state, seed=seed,
    )


# CUDA only: the tensor-core kernels (TMA tensor maps over the views on Hopper) on strided views of
# every kind a model hands them; a broadcast (stride-0) view takes the generic kernels and must agree too.
CUDA_VIEWS = ["qkv_slice", "transposed", "n_stride2", "head_slice", "broadcast_b"]


def _cuda_views(kind, B, H, N, D, E, g):
    dt, dev = torch.bfloat16, "cuda"
    if kind == "qkv_slice":  # one fused projection (B, N, 3, H, D), layout bnhd
        x = randn((B, N, 3, H, max(D, E)), g, dt, dev).requires_grad_(True)
        return x[:, :, 0, :, :D], x[:, :, 1, :, :D], x[:, :, 2, :, :E], "bnhd"
    if kind == "transposed":  # (B, N, H, D) memory seen as (B, H, N, D)
        q, k, v = (randn((B, N, H, X), g, dt, dev).requires_grad_(True) for X in (D, D, E))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "bhnd"
    if kind == "n_stride2":  # every other position of a longer sequence
        q, k, v = (randn((B, H, 2 * N, X), g, dt, dev).requires_grad_(True) for X in (D, D, E))
        return q[:, :, ::2], k[:, :, ::2], v[:, :, ::2], "bhnd"
    if kind == "head_slice":  # every other head
        q, k, v = (randn((B, 2 * H, N, X), g, dt, dev).requires_grad_(True) for X in (D, D, E))
        return q[:, ::2], k[:, ::2], v[:, ::2], "bhnd"
    assert kind == "broadcast_b"  # k, v shared by the batch: stride 0 along B
    q = randn((B, H, N, D), g, dt, dev).requires_grad_(True)
    k, v = (randn((1, H, N, X), g, dt, dev).requires_grad_(True) for X in (D, E))
    return q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), "bhnd"


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("D,E", [(64, 64), (128, 128), (128, 64)], ids=["d64e64", "d128e128", "d128e64"])
@pytest.mark.parametrize("N", [131, 1000])
@pytest.mark.parametrize("kind", CUDA_VIEWS)
def test_cuda_tensor_core_views(lasp, kind, N, D, E, seed):
    B, H = 2, 3
    g = gen(seed)
    q, k, v, layout = _cuda_views(kind, B, H, N, D, E, g)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    s0 = make_state(B, H, D, E, dtype=torch.bfloat16, device="cuda", seed=seed)
    o, f = check_against_reference(
        lasp, q, k, v, make_decay("alibi", H, "cuda", g=g), s0, dtype=torch.bfloat16, layout=layout, seed=seed,
        grad_inputs=[q, k, v, s0],
    )


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_backward_reuses_forward_segment_states(lasp, D, seed):
    """A long sequence with few heads is cut into segments; the autograd function asks the forward op to keep
    its segment input states (seg_nseg, seg_seglen: lasp_attention_fwd's fourth output) and passes them to
    the backward op (seg_states), which takes them instead of computing them again: its only phase-1 launch
    is the state-gradient one. The gradients stay those of the float64 reference."""
    B, H, N = 1, 2, 8192
    g = gen(seed)
    q, k, v = make_qkv(B, H, H, N, D, D, dtype=torch.bfloat16, device="cuda", seed=seed)
    s0 = make_state(B, H, D, D, dtype=torch.bfloat16, device="cuda", seed=seed)
    decay = make_decay("alibi", H, "cuda", g=g)
    o, f = lasp.lasp_attention(q, k, v, decay, initial_state=s0, output_final_state=True)
    do = torch.randn_like(o)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.autograd.backward([o], [do])
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    state_launches = [n for n in names if "state_kernel" in n or "state_local_kernel" in n]
    assert len(state_launches) == 1, f"backward phase-1 launches: {state_launches}"
    q2, k2, v2, s02 = (t.detach().clone().requires_grad_(True) for t in (q, k, v, s0))
    check_against_reference(lasp, q2, k2, v2, decay, s02, dtype=torch.bfloat16, seed=seed)


def _states_at_closed_form(k, v, decay, s0, starts, dtype):
    """The state before each position T of starts, gamma^T s0 + sum_{s<T} gamma^(T-1-s) k[s]^T v[s], computed
    in dtype as reference.attention_ref forms its final state (weights in float64, rounded once): the
    low-precision reference of the tolerance rule. (B, H, len(starts), D, E)."""
    lam = decay.detach().double().cpu()
    kk, vv, ss = k.detach().to(dtype), v.detach().to(dtype), s0.detach().to(dtype)
    out = []
    for T in starts:
        pos = torch.arange(T, dtype=torch.float64)
        w = torch.exp(-lam[:, None] * (T - 1 - pos)[None, :]).to(device=k.device, dtype=dtype)  # (H, T)
        st = torch.matmul((kk[:, :, :T] * w[None, :, :, None]).transpose(-1, -2), vv[:, :, :T])
        out.append(st + torch.exp(-lam * T).to(device=k.device, dtype=dtype)[None, :, None, None] * ss)
    return torch.stack(out, dim=2)


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_fwd_op_returns_segment_states(lasp, D, seed):
    """lasp_attention_fwd with the forward's split (seg_nseg > 1) returns the states at the segment starts: the
    float64 recurrence's (reference.attention_recurrent_ref, run segment after segment), by the bf16 rule,
    the first exactly the initial state; o and final_state are those of the call that keeps nothing. A split
    other than the forward's raises, naming both; the backward op takes the states and its gradients are
    those of the float64 reference."""
    B, H, N = 1, 2, 8192
    g = gen(seed)
    q, k, v = make_qkv(B, H, H, N, D, D, dtype=torch.bfloat16, device="cuda", seed=seed, requires_grad=False)
    s0 = make_state(B, H, D, D, dtype=torch.bfloat16, device="cuda", seed=seed, requires_grad=False)
    decay = make_decay("alibi", H, "cuda", g=g)
    scale = 0.5

    with pytest.raises(ValueError, match=r"lasp_attention_fwd: seg_nseg, seg_seglen must be the forward's split of "
                       r"this call, \((\d+), (\d+)\) \(or seg_nseg = 0: keep none\), got \(2, 1\)") as e:
        torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, scale, s0, None, "ring", 2, 1)
    nseg, seglen = (int(x) for x in re.search(r"call, \((\d+), (\d+)\)", str(e.value)).groups())
    assert nseg > 1 and (nseg - 1) * seglen < N <= nseg * seglen, (nseg, seglen)
    with pytest.raises(ValueError, match=rf"split of this call, \({nseg}, {seglen}\) .*got \({nseg + 1}, {seglen}\)"):
        torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, scale, s0, None, "ring", nseg + 1, seglen)

    poison_allocator("cuda")
    o, f, s_in, seg = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, scale, s0, None, "ring", nseg, seglen)
    o0, f0, _, none = torch.ops.lasp.lasp_attention_fwd(q, k, v, decay, scale, s0, None)
    assert none.numel() == 0
    assert torch.equal(o, o0) and torch.equal(f, f0), "keeping the segment states changed o or final_state"
    assert seg.shape == (B, H, nseg, D, D) and seg.dtype == torch.float32 and seg.device == q.device
    assert seg.is_contiguous()
    assert torch.equal(seg[:, :, 0], s0), "the first segment starts from the initial state"

    # float64 truth: the token-by-token recurrence, carried from one segment to the next
    starts = [i * seglen for i in range(nseg)]
    S = s0.detach().double().cpu()
    truth = []
    for T in starts:
        truth.append(S)
        end = min(N, T + seglen)
        _, S = ref.attention_recurrent_ref(*(t.detach().cpu()[:, :, T:end] for t in (q, k, v)), decay.cpu(), scale, S)
    truth = torch.stack(truth, dim=2)
    lowp = _states_at_closed_form(k, v, decay, s0, starts, torch.bfloat16)
    for i in range(1, nseg):
        assert_close_to_ref(f"seg_states[:, :, {i}] (token {starts[i]})", seg[:, :, i], truth[:, :, i],
                            torch.bfloat16, lowp[:, :, i])

    # the backward op with them (and its gradients against the float64 reference)
    do, dS = randn(o.shape, g, torch.bfloat16, "cuda"), randn(f.shape, g, torch.float32, "cuda")
    got = torch.ops.lasp.lasp_attention_bwd(q, k, v, do, dS, decay, scale, s_in, None, "ring", seg, seglen)

    def run_ref(dt):
        rq, rk, rv = (t.to(dt).requires_grad_() for t in (q, k, v))
        rs0 = s0.clone().requires_grad_()
        ro, rf = ref.attention_ref(rq, rk, rv, decay, scale, rs0, compute_dtype=dt)
        return torch.autograd.grad([ro, rf], [rq, rk, rv, rs0], [do.to(dt), dS.to(dt)])

    rg, lg = run_ref(torch.float64), run_ref(torch.bfloat16)
    for name, a, r, lp in zip(["dq", "dk", "dv", "d_initial_state"], got, rg, lg):
        assert_close_to_ref(name, a, r, torch.bfloat16, lp)
