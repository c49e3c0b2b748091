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

This module computes it with PyTorch operations (any device, autograd through them), chunk after chunk.
Under a group each rank composes its chunks' maps into its piece's (T, L), the exchange gives S_in (the
ring: S_in(r) = T(r-1) S_in(r-1) + L(r-1), rank to rank; the scan of the maps; or one all-gather of every
(T, L)), and the
backward returns T^T G along the same chain (autograd through _Hop: the ring or the scan, or the all-gather).
"""

from __future__ import annotations

from typing import Optional

import torch

CHUNK = 64


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C, C): out[..., i, j] = x[j+1] + ... + x[i] for j <= i (0 on the diagonal), -inf above."""
    C = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, C)  # xx[..., i, j] = x[i]
    lower = torch.tril(torch.ones(C, C, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~lower, 0.0)
    out = torch.cumsum(xx, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(C, C, dtype=torch.bool, device=x.device)), float("-inf"))


def _check(fn, name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _checked(fn, q, k, v, g, beta, layout, strategy, initial_state):
    """The rank-local checks; returns q, k, v, g, beta in the bhnd view."""
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
    if gd.device.type != "meta" and (bool(torch.isnan(gd).any()) or bool((gd > 0).any())):
        raise ValueError(f"{fn}: g must be <= 0 (log decay; -inf resets) and not NaN")
    if initial_state is not None:
        _check(fn, "initial_state", initial_state, (B, H, D, E))
    return q, k, v, g, beta


class _Tie(torch.autograd.Function):
    """x itself, with `anchor` (any tensor of the call's inputs) as one more input: the node that makes x then
    exists in every rank's graph, and a backward run for those inputs reaches it, even where x depends on
    none of them (an empty piece). The anchor's gradient is zero."""

    @staticmethod
    def forward(ctx, x, anchor):
        ctx.anchor_like = (anchor.shape, anchor.dtype, anchor.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, gx):
        shape, dtype, device = ctx.anchor_like
        return gx, torch.zeros(shape, dtype=dtype, device=device)


def _scan_rounds(own, pos, count, rank_of, group, tag):
    """The rounds of a recursive-doubling scan of affine maps Z -> A Z + X among ``count`` members, this one at
    position ``pos`` (member q is group rank rank_of(q)) with map ``own`` = (A, X): the composed map of the
    members before it, (A, X), or None (pos 0). Round d: the map of the d members up to this one to the
    member d further, the one of the d before those from the member d back."""
    import torch.distributed as dist

    A, X = own
    ex = None
    d = 1
    while d < count:
        reqs, recv = [], None
        if pos - d >= 0:
            recv = torch.empty(X.shape[:-1] + (A.shape[-1] + X.shape[-1],), dtype=X.dtype, device=X.device)
            reqs.append(dist.irecv(recv, src=dist.get_global_rank(group, rank_of(pos - d)), group=group, tag=tag))
        if pos + d < count:  # this member's map after the ones composed so far
            msg = torch.cat([A, X] if ex is None else [A @ ex[0], A @ ex[1] + X], dim=-1).contiguous()
            reqs.append(dist.isend(msg, dst=dist.get_global_rank(group, rank_of(pos + d)), group=group, tag=tag))
        for r in reqs:
            r.wait()
        if recv is not None:  # the d members before the ones composed so far
            ra, rx = recv[..., :A.shape[-1]], recv[..., A.shape[-1]:]
            ex = (ra, rx) if ex is None else (ex[0] @ ra, ex[0] @ rx + ex[1])
        d *= 2
    return ex


def _scan_maps(A, X, group, rank, world, direction, tag, node_size=0):
    """The scan of the affine maps Z -> A_j Z + X_j (A_j: (B, H, D, D), X_j: (B, H, D, E)) of the ranks before
    this one along ``direction`` (1: lower ranks first, the forward; -1: higher ranks first, the backward),
    composed and applied to a zero state; None where no rank comes before. node_size m (1 < m < world):
    ranks fill nodes of m consecutive ranks, and the scan runs within each node, then among the nodes' last
    ranks (along the direction) over the nodes' maps, then each node's last rank sends the state entering its
    node to the others (as lasp_attention's "scan:<m>", csrc/exchange.h)."""
    import torch.distributed as dist

    m = node_size if 1 < node_size < world else world
    K, node = -(-world // m), rank // m
    n0, n1 = node * m, min(world, node * m + m)
    size = n1 - n0
    j = rank - n0 if direction > 0 else n1 - 1 - rank

    def mate(q):
        return n0 + q if direction > 0 else n1 - 1 - q

    ex = _scan_rounds((A, X), j, size, mate, group, tag)
    if K == 1:
        return None if ex is None else ex[1]
    ni = node if direction > 0 else K - 1 - node

    def leader(q):  # the last rank along the direction of the node at position q
        p = q if direction > 0 else K - 1 - q
        return min(world, (p + 1) * m) - 1 if direction > 0 else p * m

    entering = None
    if j == size - 1:
        inc = (A, X) if ex is None else (A @ ex[0], A @ ex[1] + X)
        nodes_before = _scan_rounds(inc, ni, K, leader, group, tag + 0x100)
        entering = None if nodes_before is None else nodes_before[1].contiguous()
        if ni > 0:
            reqs = [dist.isend(entering, dst=dist.get_global_rank(group, mate(q)), group=group, tag=tag + 0x200)
                    for q in range(size - 1)]
            for r in reqs:
                r.wait()
    elif ni > 0:
        entering = torch.empty_like(X)
        dist.recv(entering, src=dist.get_global_rank(group, leader(ni)), group=group, tag=tag + 0x200)
    if entering is None:
        return None if ex is None else ex[1]
    return entering if ex is None else ex[0] @ entering + ex[1]


class _Hop(torch.autograd.Function):
    """S_in of this rank (rank 0: its initial state) in the chain of the pieces' maps S -> T S + L, and its
    backward: G_out, the gradient w.r.t. this rank's outgoing state, from the ranks after it, and
    total = grad S_in + T^T G_out to the ones before. ``scan`` None: the ring (S_in from the rank before, T S_in
    + L to the one after; backward: G_out from the one after, total to the one before); else the recursive-
    doubling scan over nodes of ``scan`` ranks (0: one level; _scan_maps), rank 0's initial state folded into
    its L, and in the backward the suffix scan of G -> T^T G + grad S_in."""

    @staticmethod
    def forward(ctx, T, L, s0, group, rank, world, scan):
        import torch.distributed as dist

        if scan is not None:  # every rank takes part (rank 0 sends only)
            before = _scan_maps(T, T @ s0 + L if rank == 0 else L, group, rank, world, 1, 0x1D5, scan)
            s_in = s0.detach().clone() if rank == 0 else before
        else:
            if rank == 0:
                s_in = s0.detach().clone()
            else:
                s_in = torch.empty_like(L)
                dist.recv(s_in, src=dist.get_global_rank(group, rank - 1), group=group)
            if rank < world - 1:
                dist.send((T @ s_in + L).contiguous(), dst=dist.get_global_rank(group, rank + 1), group=group)
        ctx.save_for_backward(T, s_in)
        ctx.group, ctx.rank, ctx.world, ctx.scan = group, rank, world, scan
        return s_in

    @staticmethod
    def backward(ctx, g_in):
        import torch.distributed as dist

        T, s_in = ctx.saved_tensors
        group, rank, world = ctx.group, ctx.rank, ctx.world
        g_in = torch.zeros_like(s_in) if g_in is None else g_in
        if ctx.scan is not None:
            g_out = _scan_maps(T.transpose(-1, -2).contiguous(), g_in, group, rank, world, -1, 0x1D6, ctx.scan)
            g_out = torch.zeros_like(s_in) if g_out is None else g_out  # the last rank: nothing after it
            total = g_in + T.transpose(-1, -2) @ g_out
        else:
            g_out = torch.zeros_like(s_in)
            if rank < world - 1:
                dist.recv(g_out, src=dist.get_global_rank(group, rank + 1), group=group)
            total = g_in + T.transpose(-1, -2) @ g_out
            if rank > 0:
                dist.send(total.contiguous(), dst=dist.get_global_rank(group, rank - 1), group=group)
        # only rank 0 reads its initial state: the others' get a zero gradient (a sum over the group is exact)
        return (g_out @ s_in.transpose(-1, -2), g_out, total if rank == 0 else torch.zeros_like(total), None, None,
                None, None)


def _exchange(group, strategy, rank, world):
    """(T, L, s0, anchor) -> S_in of this rank (differentiable), by the ring or by one all-gather of every
    (T, L). Every rank must run the exchange's backward (a chain of point-to-point messages, or a
    collective): `anchor` ties it to the call's inputs (_Tie)."""
    if strategy == "ring" or strategy.startswith("scan"):
        scan = None if strategy == "ring" else (int(strategy[5:]) if strategy.startswith("scan:") else 0)
        return lambda T, L, s0, anchor: _Hop.apply(_Tie.apply(T, anchor), L, s0, group, rank, world, scan)

    def allgather(T, L, s0, anchor):
        from torch.distributed.nn.functional import all_gather

        # One all-gather of [T | L | s0]: every rank reads rank 0's part (its initial state), so every
        # rank runs the gather's backward (a collective) once.
        D = T.shape[-1]
        parts = all_gather(_Tie.apply(torch.cat([T, L, s0], dim=-1).contiguous(), anchor), group=group)
        s = parts[0][..., D + L.shape[-1]:]  # rank 0's initial state
        for j in range(rank):
            s = parts[j][..., :D] @ s + parts[j][..., D:D + L.shape[-1]]
        return s

    return allgather


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
            state); differentiable.
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
        layout: "bhnd" or "bnhd" (fla's layout); the output comes back in it.
        strategy: "ring", "allgather" (see group), "scan" (a recursive-doubling scan of the pieces' maps:
            ceil(log2 W) rounds of one (T, L) message per rank) or "auto": of the ring and the all-gather,
            the one the cost model of lasp.scaling predicts
            to be faster for this group and state size (lasp.distributed.choose_strategy with
            op="gated_delta_attention" says which and why; the same on every rank).
        cu_seqlens: packed documents of one row (batch size 1), global offsets [0, ..., N]: the state
            restarts at every document start (g = -inf there; the given g there gets a zero gradient).
            Not with initial_state / output_final_state (one state per document) yet.
        use_qk_l2norm: divide q and k by sqrt(sum of squares + 1e-6) over D first (fla's
            ``use_qk_l2norm_in_kernel``).
    Returns:
        o in q's dtype and layout, or (o, final_state) with final_state in float32 (float64 for float64).

    Mapping to fla: ``chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
    cu_seqlens, use_qk_l2norm_in_kernel)`` with fla's (B, N, H, .) tensors is this op with layout="bnhd".
    Computed with PyTorch operations (any device; float32 inside for 16-bit inputs), chunks of 64.
    """
    fn = "lasp.gated_delta_attention"
    name = None
    if group is not None:
        from ._ops import _group_name

        name = _group_name(group)  # None: a group of one rank
    # Checks that need no other rank first; under a group their outcome travels with the call's
    # description, so that every rank raises alike (no rank waits for one that has raised).
    try:
        q, k, v, g, beta = _checked(fn, q, k, v, g, beta, layout, strategy, initial_state)
        local_err = None
    except (TypeError, ValueError) as e:
        local_err = e
    from .distributed import (_cu_signature, _document_resets, _gather_rows, _raise_if_invalid, _resolve_strategy,
                              check_cu_seqlens)

    cu = None
    if cu_seqlens is not None and local_err is None:
        try:
            cu = check_cu_seqlens(cu_seqlens, None, fn)
        except (TypeError, ValueError) as e:
            local_err = e
    ok = local_err is None
    B, H, N, D = (q.shape[0], max(q.shape[1], v.shape[1]), q.shape[2], q.shape[3]) if ok else (0, 0, 0, 0)
    E = v.shape[3] if ok else 0
    states_with_cu = int(cu is not None and (initial_state is not None or bool(output_final_state)))
    # [N, ok, states with cu_seqlens, then what every rank must share]
    heads3 = [q.shape[1], k.shape[1], v.shape[1]] if ok else [0, 0, 0]
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    dcode = dtypes.index(q.dtype) if ok and q.dtype in dtypes else -1
    desc = [int(ok), states_with_cu, B, H, D, E, *heads3, dcode, int(cu is not None), int(bool(use_qk_l2norm)),
            ("ring", "allgather", "scan", "auto").index(strategy) if ok else -1]
    rows, rank = _gather_rows(group if name is not None else None, [N] + desc + _cu_signature(cu))
    _raise_if_invalid(rows, 1, local_err, f"{fn}: the call")
    differ = [i for i, r in enumerate(rows) if r[3:] != rows[0][3:]]
    if differ:
        raise ValueError(f"{fn}: every rank of the group must call alike (batch size, q / k / v heads, head dims, "
                         "dtype, cu_seqlens, use_qk_l2norm, strategy; only the pieces' lengths may differ): group ranks "
                         f"{differ} differ from group rank 0")
    if any(r[2] for r in rows):
        raise NotImplementedError(f"{fn}: initial_state and output_final_state with cu_seqlens (one state per "
                                  "document) are not supported yet")
    total, offset = sum(r[0] for r in rows), sum(r[0] for r in rows[:rank])
    if cu is not None:
        if B != 1:
            raise ValueError(f"{fn}: cu_seqlens needs one packed row (batch size 1), got batch size {B}")
        if int(cu[-1]) != total:
            raise ValueError(f"{fn}: the last offset of cu_seqlens ({int(cu[-1])}) must equal the packed length "
                             f"({total}{', the sum of the pieces over the group' if len(rows) > 1 else ''})")
        g = g.masked_fill(_document_resets(cu, offset, offset + N, g.device), float("-inf"))
    ring = None
    if name is not None:
        # every value "auto" reads is the same on every rank (compared above): the ranks pick alike
        strategy = _resolve_strategy(fn, strategy, group, q, v, gates=True, op="gated_delta_attention")
        ring = _exchange(group, strategy, rank, len(rows))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else float(scale)

    def heads(x):  # (B, Hx, N, X) -> (B, H, N, X) in acc
        x = x.to(acc)
        hx = x.shape[1]
        return x if hx == H else x.repeat_interleave(H // hx, dim=1)

    qh, kh, vh = heads(q), heads(k), heads(v)
    if use_qk_l2norm:
        qh = qh / torch.sqrt((qh * qh).sum(-1, keepdim=True) + 1e-6)
        kh = kh / torch.sqrt((kh * kh).sum(-1, keepdim=True) + 1e-6)
    gl, bt = g.to(acc), beta.to(acc)
    C = CHUNK
    nc = (N + C - 1) // C
    pad = nc * C - N
    if pad:  # padded tokens: k = v = q = 0, beta = 0, g = 0: they change nothing
        qh, kh, vh = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qh, kh, vh))
        gl, bt = (torch.nn.functional.pad(x, (0, pad)) for x in (gl, bt))
    qc, kc, vc = (x.view(B, H, nc, C, x.shape[-1]) for x in (qh, kh, vh))
    gc, bc = gl.view(B, H, nc, C), bt.view(B, H, nc, C)
    gam = torch.exp(_segsum(gc))                               # (B, H, nc, C, C), lower incl. diagonal
    pre = torch.exp(torch.cumsum(gc, dim=-1))                  # (B, H, nc, C)
    suf = gam[..., C - 1, :]                                   # exp(g[j+1] + ... + g[C-1])
    strict = torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device), diagonal=-1)
    kk = kc @ kc.transpose(-1, -2)
    A = (bc.unsqueeze(-1) * gam * kk).masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=acc, device=q.device)
    rhs = torch.cat([bc.unsqueeze(-1) * vc, (bc * pre).unsqueeze(-1) * kc], dim=-1)  # [beta V | beta pre K]
    w = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    wv, wk = w[..., :E], w[..., E:]
    qk = (qc @ kc.transpose(-1, -2)) * gam                     # causal, decayed
    s0 = (initial_state.to(acc) if initial_state is not None
          else torch.zeros(B, H, D, E, dtype=acc, device=q.device))
    if ring is not None:
        # The piece maps its incoming state affinely, S_out = T S_in + L: compose the chunks' maps, then
        # the exchange gives S_in (rank 0: the initial state), with T^T carrying gradients back.
        T = torch.eye(D, dtype=acc, device=q.device).expand(B, H, D, D)
        L = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
        for c in range(nc):
            ks = (suf[:, :, c].unsqueeze(-1) * kc[:, :, c]).transpose(-1, -2)  # (B, H, D, C)
            p_end = pre[:, :, c, C - 1, None, None]
            T = p_end * T - ks @ (wk[:, :, c] @ T)
            L = p_end * L + ks @ (wv[:, :, c] - wk[:, :, c] @ L)
        s0 = ring(T, L, s0, qh if qh.requires_grad else (kh if kh.requires_grad else (vh if vh.requires_grad
                                                             else (gl if gl.requires_grad else bt))))
    S = s0
    outs = []
    for c in range(nc):
        u = wv[:, :, c] - wk[:, :, c] @ S                      # (B, H, C, E)
        outs.append(scale * (pre[:, :, c].unsqueeze(-1) * (qc[:, :, c] @ S) + qk[:, :, c] @ u))
        S = pre[:, :, c, C - 1, None, None] * S + (suf[:, :, c].unsqueeze(-1) * kc[:, :, c]).transpose(-1, -2) @ u
    o = torch.cat(outs, dim=2)[:, :, :N] if nc else torch.zeros(B, H, 0, E, dtype=acc, device=q.device)
    if nc == 0:  # an empty piece: o still leads back to every input (empty gradients, not None) and to the
        # exchange, whose backward every rank must run for the chain's gradients to pass it
        o = o + 0.0 * (s0.sum() + qh.sum() + kh.sum() + vh.sum() + gl.sum() + bt.sum())
    o = o.to(q.dtype)
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, S) if output_final_state else o
