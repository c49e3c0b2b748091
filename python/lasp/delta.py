"""The gated delta rule (Gated DeltaNet: Qwen3-Next / Qwen3.5, OLMo hybrid) in its chunked form.

    S[t] = a[t] (I - beta[t] k[t]^T k[t]) S[t-1] + beta[t] k[t]^T v[t],   a[t] = exp(g[t]),   o[t] = scale q[t] S[t]

With u[t] = beta[t] (v[t] - a[t] k[t] S[t-1]) the state is a gated linear-attention state whose values are
the u: S[t] = a[t] S[t-1] + k[t]^T u[t]. Inside a chunk of C tokens entered with state S0, with
Gam[i, j] = exp(g[j+1] + ... + g[i]) (j <= i) and pre[i] = exp(g[0] + ... + g[i]):

    (I + A) U = diag(beta) V - diag(beta pre) K S0,     A[i, j] = beta[i] Gam[i, j] (k[i] . k[j])  (j < i)
    o = scale (diag(pre) Q S0 + (Q K^T * Gam) U),       S_end = pre[C-1] S0 + (diag(Gam[C-1, :]) K)^T U

so U = W_v - W_k S0 with W_v, W_k from one unit-lower-triangular solve per chunk (the WY / UT form), and
the chunk maps S0 affinely: S_end = T S0 + L with the d x d transition T = pre[C-1] I - (Gam[C-1] K)^T W_k.
Every weight is the exp of a sum over its own range (never a difference of cumulative sums), so g = -inf
(a reset, as at a packed document's start) gives exact zeros.

The dispatcher ops of csrc/delta.cpp compute it: torch.ops.lasp.gated_delta_attention with its C++ autograd
function, on one device and under a group (each rank computes its piece's map (T, L) of states, the C++
exchange gives S_in (the ring: S_in(r) = T(r-1) S_in(r-1) + L(r-1), rank to rank; the scan of the maps; or
one all-gather of every (T, L)), then the piece runs from S_in; the backward passes the gradients back along
the same chain with T^T). Packed documents with per-document states are composed here (_DeltaPiece) from
the same ops: the piece runs as segments between the document starts.
"""

from __future__ import annotations

from typing import Optional

import contextlib

import torch
from torch.autograd.function import once_differentiable


def _check(fn, name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


@contextlib.contextmanager
def _values_read():
    """The C++ ops called on this thread inside it read no values of g or decay (their caller has): the thread's
    own value-check setting off, the one before it back after."""
    before = torch.ops.lasp._thread_value_checks(0)
    try:
        yield
    finally:
        torch.ops.lasp._thread_value_checks(before)


def _checked(fn, q, k, v, g, beta, layout, strategy, initial_state, check_values):
    """The rank-local checks; returns q, k, v, g, beta in the bhnd view and whether g's values were read.
    check_values: also that g holds no positive or NaN value (under a group, so that every rank raises alike;
    on one device the op checks)."""
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"{fn}: layout must be 'bhnd' or 'bnhd', got {layout!r}")
    if not isinstance(strategy, str) or strategy not in ("ring", "allgather", "scan", "auto"):
        raise ValueError(f"{fn}: strategy must be 'ring', 'allgather', 'scan' or 'auto', got {strategy!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, t in (("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be a 3-D tensor (one value per batch, head and token), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if layout == "bnhd":
        q, k, v, g, beta = (t.transpose(1, 2) for t in (q, k, v, g, beta))
    B, Hq, N, D = q.shape
    Hk, Hv, E = k.shape[1], v.shape[1], v.shape[3]
    for name, t in (("q", q), ("v", v)):
        if t.shape[3] < 1:
            raise ValueError(f"{fn}: {name} must have a head dim of at least 1, got shape {tuple(t.shape)}")
    H = max(Hq, Hv)
    for name, h in (("q", Hq), ("k", Hk), ("v", Hv)):
        if h < 1 or H % h:
            raise ValueError(f"{fn}: the {name} heads ({h}) must divide the output heads max(Hq, Hv) = {H}")
    _check(fn, "k", k, (B, Hk, N, D))
    _check(fn, "v", v, (B, Hv, N, E))
    _check(fn, "g", g, (B, H, N))
    _check(fn, "beta", beta, (B, H, N))
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} must be on q's device {q.device}, got {t.device}")
    gd = g.detach()
    # values are checked where there are values (not on meta tensors: shapes only)
    read = check_values and gd.device.type != "meta" and torch.ops.lasp.get_value_checks()
    if read and not bool((gd <= 0).all()):  # one read: NaN fails "<= 0" too
        raise ValueError(f"{fn}: g must be <= 0 (log decay; -inf resets) and not NaN")
    if initial_state is not None:
        _check(fn, "initial_state", initial_state, (B, H, D, E))
    return q, k, v, g, beta, read


class _Exchange:
    """The chain of the pieces' maps S -> T S + L across the group's ranks, without autograd (_DeltaPiece
    calls it in its forward and backward): the C++ exchange of lasp_attention with matrix transitions
    (torch.ops.lasp.gated_delta_exchange; csrc/exchange.h). forward(T, L, s0): this rank's S_in (rank 0: s0).
    backward(T, g_in): G_out, the gradient of this rank's outgoing state from the ranks after it (None on the
    last), given g_in, the gradient of S_in from this rank's own piece; the chain passes g_in + T^T G_out
    back."""

    def __init__(self, group, strategy, rank, world):
        from ._ops import _group_name

        self.name, self.strategy, self.rank, self.world = _group_name(group), strategy, rank, world

    def forward(self, T, L, s0):
        return torch.ops.lasp.gated_delta_exchange(T, L, s0, self.name, self.strategy, False)

    def backward(self, T, g_in):
        g_out = torch.ops.lasp.gated_delta_exchange(T, g_in.to(T.dtype), None, self.name, self.strategy, True)
        return None if self.rank == self.world - 1 else g_out


def _cat_tokens(xs, like):
    """The segments xs (B, H, n_i, ...) joined along the tokens, in the memory order of ``like`` (the op's outputs
    and gradients keep the inputs' order; torch.cat's result would be contiguous in (B, H, N, ...))."""
    if len(xs) == 1:
        return xs[0]
    shape = list(xs[0].shape)
    shape[2] = sum(int(x.shape[2]) for x in xs)
    order = sorted(range(like.dim()), key=lambda i: -like.stride(i))  # outermost first
    out = xs[0].new_empty([shape[i] for i in order]).permute([order.index(i) for i in range(like.dim())])
    a = 0
    for x in xs:
        out.narrow(2, a, x.shape[2]).copy_(x)
        a += x.shape[2]
    return out


class _DeltaPiece(torch.autograd.Function):
    """One rank's piece with per-document states, as segments, each run by the ops from its own starting state. segs: [(a, b, j)],
    tokens [a, b) of the piece starting from ``states[j]`` (the initial state of document j, which starts at a;
    zeros where states is None) or, for j = -1 (first segment only), from S_in: the state the exchange brings
    (exchange None: s0). Returns (o, F) with F (len(segs), B, H, D, E) the segments' final states.

    Under a group the piece maps the state it receives to the one it sends, S_out = T S_in + L: with one
    segment from S_in, (T, L) is gated_delta_map's; where a document starts in the piece, T = 0 and L is the
    last segment's final state. The exchange passes S_in along; then each segment runs (gated_delta_fwd, whose
    third output, each chunk's m^-1 where the device keeps it, its backward reads again).
    Backward: the gradient of S_in from this piece alone (one segment: gated_delta_bwd's state_grad_only; else
    the first segment's full backward) goes into the exchange's backward, which returns G_out, the gradient
    of S_out from the ranks after this one; the last segment's backward then takes it with its own. Only
    rank 0 reads s0: the others get a zero gradient for it (a sum over the group is exact)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, states, scale, exchange, segs):
        ops = torch.ops.lasp
        parts = [tuple(t.narrow(2, a, b - a) for t in (q, k, v, g, beta)) for a, b, _ in segs]

        def start(j, s_in):
            if j < 0:
                return s_in
            return states[j:j + 1] if states is not None else torch.zeros_like(s0)

        chain = len(segs) == 1 and segs[0][2] < 0
        s_in, T, last = s0, None, None
        if exchange is not None:
            if chain:
                T, L = ops.gated_delta_map(q, k, v, g, beta)
            else:  # a document starts in the piece: the state sent on is its last segment's, whatever S_in is
                last = ops.gated_delta_fwd(*parts[-1], scale, start(segs[-1][2], None))
                L = last[1]
                T = torch.zeros(L.shape[:-1] + (L.shape[-2],), dtype=L.dtype, device=L.device)
            s_in = exchange.forward(T, L, s0.to(L.dtype))
        res = [last if i == len(segs) - 1 and last is not None else
               ops.gated_delta_fwd(*parts[i], scale, start(j, s_in)) for i, (_, _, j) in enumerate(segs)]
        o = _cat_tokens([r[0] for r in res], v if v.shape[1] > q.shape[1] else q)
        F = torch.stack([r[1] for r in res])
        ctx.save_for_backward(q, k, v, g, beta, s_in, T, states, *[r[2] for r in res])
        ctx.scale, ctx.exchange, ctx.segs, ctx.s0_like = scale, exchange, segs, (s0.dtype, s0.shape)
        return o, F

    @staticmethod
    def backward(ctx, do, dF):
        ops = torch.ops.lasp
        q, k, v, g, beta, s_in, T, states, *minv = ctx.saved_tensors
        segs, exchange, scale = ctx.segs, ctx.exchange, ctx.scale
        parts = [tuple(t.narrow(2, a, b - a) for t in (q, k, v, g, beta, do)) for a, b, _ in segs]

        def start(j):
            if j < 0:
                return s_in
            return states[j:j + 1] if states is not None else torch.zeros_like(s_in)

        def bwd(i, dfin, state_only=False):
            *ins, dos = parts[i]
            return ops.gated_delta_bwd(*ins, scale, start(segs[i][2]), dos, dfin, state_only, minv[i])

        res = [None] * len(segs)
        from_s_in = segs[0][2] < 0
        if len(segs) == 1 and from_s_in:
            g_in = bwd(0, dF[0], True)[5] if exchange is not None else None
        else:
            if from_s_in:
                res[0] = bwd(0, dF[0])
            g_in = res[0][5] if from_s_in else torch.zeros_like(s_in)
        g_out = exchange.backward(T, g_in) if exchange is not None else None
        for i in range(len(segs)):
            if res[i] is None:
                dfin = dF[i] if g_out is None or i < len(segs) - 1 else dF[i] + g_out
                res[i] = bwd(i, dfin)
        grads = [_cat_tokens([x[c] for x in res], t) for c, t in enumerate((q, k, v, g, beta))]
        dtype, shape = ctx.s0_like
        ds0 = torch.zeros(shape, dtype=dtype, device=q.device)
        if from_s_in and (exchange is None or exchange.rank == 0):
            ds0 = res[0][5].to(dtype)
        dstates = None
        if states is not None and ctx.needs_input_grad[6]:
            dstates = torch.zeros_like(states)
            for (_, _, j), r in zip(segs, res):
                if j >= 0:
                    dstates[j] += r[5][0].to(states.dtype)
        return (*grads, ds0, dstates, None, None, None)


def _check_doc_states(fn, initial_state, num_docs, q, v):
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(f"{fn}: initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}")
    want = (num_docs, max(q.shape[1], v.shape[1]), q.shape[3], v.shape[3])
    if tuple(initial_state.shape) != want:
        raise ValueError(f"{fn}: with cu_seqlens, initial_state must have shape (num_docs, H, D, E) = {want} (one "
                         f"state per document), got {tuple(initial_state.shape)}")
    if not initial_state.is_floating_point():
        raise TypeError(f"{fn}: initial_state must be a floating-point tensor, got {initial_state.dtype}")
    if initial_state.device != q.device:
        raise ValueError(f"{fn}: initial_state must be on q's device {q.device}, got {initial_state.device}")


class _L2Norm(torch.autograd.Function):
    """x / sqrt(sum of squares over the last dim + 1e-6) in the acc dtype. It keeps for the backward its output
    (which the pieces keep anyway) and each row's 1 / norm, not x nor x's copy in acc; the backward is
    dx = r (dy - y sum(dy y)) in acc, as exact as the derivative of the ATen form, in x's dtype."""

    @staticmethod
    def forward(ctx, x, acc):
        xa = x.to(acc)
        r = torch.rsqrt((xa * xa).sum(-1, keepdim=True) + 1e-6)
        y = xa * r
        ctx.save_for_backward(y, r)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, r = ctx.saved_tensors
        dy = dy.to(y.dtype)
        return (r * (dy - y * (dy * y).sum(-1, keepdim=True))).to(ctx.dtype), None


def gated_delta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    group=None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    layout: str = "bhnd",
    strategy: str = "ring",
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
):
    """The gated delta rule (see the module docstring), fla's ``chunk_gated_delta_rule`` semantics.

    Args:
        q: (B, Hq, N, D) for layout "bhnd", (B, N, Hq, D) for "bnhd"; k: (B, Hk, N, D); v: (B, Hv, N, E).
            Output heads H = max(Hq, Hv), head maps as in :func:`lasp.lasp_attention` (GVA included).
        g: per-token log decay (B, H, N) ("bhnd") or (B, N, H) ("bnhd"), values <= 0 (-inf resets the
            state; a positive or NaN value raises a ValueError: lasp.set_value_checks); differentiable.
        beta: the write strength (B, H, N) or (B, N, H), usually in (0, 1); differentiable.
        scale: default D^-0.5.
        group: a torch.distributed group over which the sequence is split (group rank i holds the i-th
            contiguous piece, any length, empty too); each piece maps its incoming state affinely,
            S_out = T S_in + L (T: D x D per head), and the exchange passes S_in along (strategy "ring":
            rank to rank, point to point; "allgather": one all-gather of every (T, L)). Every rank must
            run the backward (the gradients pass the chain back, with T^T). One small all-gather first
            checks that the ranks call alike (every rank raises the same error otherwise).
        initial_state: (B, H, D, E), the state before the sequence (differentiable); None: zeros. Under a
            group only rank 0's is read (the others get a zero gradient).
        output_final_state: also return the (B, H, D, E) state after this rank's piece.
        layout: "bhnd" or "bnhd" (fla's layout); the output comes back in it, in the memory order of q (of v
            where v has more heads): contiguous for contiguous inputs, so o.view(B, N, H * E) works for "bnhd".
            Each input's gradient has that input's memory order (dense inputs: its strides).
        strategy: "ring", "allgather" (see group), "scan" (a recursive-doubling scan of the pieces' maps:
            ceil(log2 W) rounds of one (T, L) message per rank) or "auto": of the ring and the all-gather,
            the one the cost model of lasp.scaling predicts
            to be faster for this group and state size (lasp.distributed.choose_strategy with
            op="gated_delta_attention" says which and why; the same on every rank).
        cu_seqlens: packed documents of one row (batch size 1), global offsets [0, ..., N]: the state
            restarts at every document start (g = -inf there; the given g there gets a zero gradient).
            Under a group every rank passes the same offsets and its contiguous piece (any length, empty
            too; a document may span any number of ranks). Per-document states: initial_state is then
            (num_docs, H, D, E) (any floating dtype, the same shape on every rank), document j's row read on
            the rank where j starts (the others get a zero gradient for it; the gate of j's first token
            multiplies it, as without cu_seqlens); output_final_state returns (num_docs, H, D, E) in the
            accumulation dtype: the final states of the documents ending in this rank's piece, zeros
            elsewhere (their sum over the group is every document's). The piece then runs as one call of
            the ops per document in it.
        use_qk_l2norm: divide q and k by sqrt(sum of squares + 1e-6) over D first (fla's
            ``use_qk_l2norm_in_kernel``).
    Returns:
        o in q's dtype and layout, or (o, final_state) with final_state in float32 (float64 for float64).

    Mapping to fla: ``chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
    cu_seqlens, use_qk_l2norm_in_kernel)`` with fla's (B, N, H, .) tensors is this op with layout="bnhd".
    Computed by the ops of csrc/delta.cpp (float32 inside for 16-bit inputs; chunks of 64). On one device
    (no group) it is torch.ops.lasp.gated_delta_attention, which torch.compile traces whole.
    """
    from ._ops import _group_name, _real_scale

    fn = "lasp.gated_delta_attention"
    name = None
    if group is not None:
        name = _group_name(group)  # None: a group of one rank
    # Checks that need no other rank first; under a group their outcome travels with the call's
    # description, so that every rank raises alike (no rank waits for one that has raised).
    values_read = False
    try:
        q, k, v, g, beta, values_read = _checked(fn, q, k, v, g, beta, layout, strategy,
                                                 initial_state if cu_seqlens is None else None, name is not None)
        if scale is not None:
            scale = _real_scale(fn, scale)
        local_err = None
    except (TypeError, ValueError) as e:
        local_err = e
    from .distributed import _checked_offsets, _cu_signature, _gather_rows, _raise_if_invalid, _resolve_strategy

    cu = off = None
    if cu_seqlens is not None and local_err is None:
        try:
            off = _checked_offsets(cu_seqlens, fn)
            cu = off.cu
            if initial_state is not None:  # one state per document
                _check_doc_states(fn, initial_state, cu.numel() - 1, q, v)
        except (TypeError, ValueError) as e:
            local_err = e
    ok = local_err is None
    B, H, N, D = (q.shape[0], max(q.shape[1], v.shape[1]), q.shape[2], q.shape[3]) if ok else (0, 0, 0, 0)
    E = v.shape[3] if ok else 0
    doc_states = [int(cu is not None and initial_state is not None), int(cu is not None and bool(output_final_state))]
    # [N, ok, then what every rank must share]
    heads3 = [q.shape[1], k.shape[1], v.shape[1]] if ok else [0, 0, 0]
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    dcode = dtypes.index(q.dtype) if ok and q.dtype in dtypes else -1
    desc = [int(ok), B, H, D, E, *heads3, dcode, int(cu is not None), int(bool(use_qk_l2norm)),
            ("ring", "allgather", "scan", "auto").index(strategy) if ok else -1, *doc_states]
    signature = off.signature if off is not None else _cu_signature(None)
    rows, rank = _gather_rows(group if name is not None else None, [N] + desc + signature)
    _raise_if_invalid(rows, 1, local_err, f"{fn}: the call")
    differ = [i for i, r in enumerate(rows) if r[2:] != rows[0][2:]]
    if differ:
        raise ValueError(f"{fn}: every rank of the group must call alike (batch size, q / k / v heads, head dims, "
                         "dtype, cu_seqlens, use_qk_l2norm, strategy, and with cu_seqlens whether initial_state and "
                         "output_final_state are given; only the pieces' lengths may differ): group ranks "
                         f"{differ} differ from group rank 0")
    total, offset = sum(r[0] for r in rows), sum(r[0] for r in rows[:rank])
    if cu is not None:
        if B != 1:
            raise ValueError(f"{fn}: cu_seqlens needs one packed row (batch size 1), got batch size {B}")
        if int(cu[-1]) != total:
            raise ValueError(f"{fn}: the last offset of cu_seqlens ({int(cu[-1])}) must equal the packed length "
                             f"({total}{', the sum of the pieces over the group' if len(rows) > 1 else ''})")
    per_doc = cu is not None and (initial_state is not None or bool(output_final_state))
    if cu is not None and not per_doc:  # one call over the piece, the state dropped at every start
        # torch.where keeps g's memory order (masked_fill's result, and so the gradient of g, would be contiguous)
        g = torch.where(off.starts(offset, offset + N, g.device), float("-inf"), g)
    scale = D ** -0.5 if scale is None else float(scale)
    if name is not None:
        # every value "auto" reads is the same on every rank (compared above): the ranks pick alike
        strategy = _resolve_strategy(fn, strategy, group, q, v, gates=True, op="gated_delta_attention")
    # under a group _checked has read g's values on every rank: the C++ ops of this call need not read them again
    with _values_read() if values_read else contextlib.nullcontext():
        if not per_doc:
            # the op with its C++ autograd (one device: it checks g's values itself; under a group: the piece's map,
            # the exchange and the piece, C++ too)
            o, S = torch.ops.lasp.gated_delta_attention(q, k, v, g, beta, scale, initial_state, bool(use_qk_l2norm),
                                                        name, strategy)
        else:  # per-document states: segments between the document starts in the piece, each from its document's
            # initial state (the first, before any start, from the state the exchange brings)
            exchange = None if name is None else _Exchange(group, strategy, rank, len(rows))
            acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
            local = [(j, int(cu[j]) - offset) for j in range(cu.numel() - 1) if offset <= int(cu[j]) < offset + N]
            cuts = [p for _, p in local] + [N]
            segs = ([(0, cuts[0], -1)] if not local or cuts[0] > 0 else []) + [
                (p, cuts[i + 1], j) for i, (j, p) in enumerate(local)]
            states = None if initial_state is None else initial_state.to(acc)
            s0 = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
            qq, kk = (_L2Norm.apply(q, acc), _L2Norm.apply(k, acc)) if use_qk_l2norm else (q, k)
            o, F = _DeltaPiece.apply(qq, kk, v, g, beta, s0, states, scale, exchange, segs)
            o = o.to(q.dtype)
            S = F[-1]
            if output_final_state:
                # the final states of the documents ending in this piece, zeros elsewhere
                # the document open at the piece's start
                first_doc = int(torch.searchsorted(cu, torch.tensor(offset), right=True)) - 1
                rows_idx, ends = [], []
                for i, (a, b, j) in enumerate(segs):
                    doc = first_doc if j < 0 else j
                    if b - a > 0 and int(cu[doc + 1]) <= offset + N:
                        rows_idx.append(doc)
                        ends.append(i)
                # (index_copy also where no document ends here: the zeros are then still an output of the graph)
                S = torch.zeros(cu.numel() - 1, H, D, E, dtype=acc, device=q.device).index_copy(
                    0, torch.tensor(rows_idx, dtype=torch.long, device=q.device),
                    F[torch.tensor(ends, dtype=torch.long), 0])
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, S) if output_final_state else o
