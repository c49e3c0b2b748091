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
        group: sequence parallelism is not available for this op yet: a group of more than one rank
            raises NotImplementedError.
        initial_state: (B, H, D, E), the state before the sequence (differentiable); None: zeros.
        output_final_state: also return the (B, H, D, E) state after the sequence.
        layout: "bhnd" or "bnhd" (fla's layout); the output comes back in it.
        strategy: "ring" or "allgather" (for the sequence-parallel path, once there is one).
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
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"{fn}: layout must be 'bhnd' or 'bnhd', got {layout!r}")
    if strategy not in ("ring", "allgather"):
        raise ValueError(f"{fn}: strategy must be 'ring' or 'allgather', got {strategy!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if group is not None:
        from ._ops import _group_name

        if _group_name(group) is not None:
            raise NotImplementedError(f"{fn}: sequence parallelism (a group of more than one rank) is not "
                                      "available for the gated delta rule yet; pass group=None")
    if layout == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        for name, t in (("g", g), ("beta", beta)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{fn}: {name} must be 3-D (batch, tokens, heads) for layout 'bnhd'")
        g, beta = g.transpose(1, 2), beta.transpose(1, 2)
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
    if bool(torch.isnan(gd).any()) or bool((gd > 0).any()):
        raise ValueError(f"{fn}: g must be <= 0 (log decay; -inf resets) and not NaN")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        _check(fn, "initial_state", initial_state, (B, H, D, E))
    if cu_seqlens is not None:
        from .distributed import check_cu_seqlens

        cu = check_cu_seqlens(cu_seqlens, N, fn)
        if B != 1:
            raise ValueError(f"{fn}: cu_seqlens needs one packed row (batch size 1), got batch size {B}")
        if initial_state is not None or output_final_state:
            raise NotImplementedError(f"{fn}: initial_state and output_final_state with cu_seqlens (one state "
                                      "per document) are not supported yet")
        reset = torch.zeros(N, dtype=torch.bool)
        reset[cu[:-1]] = True
        g = g.masked_fill(reset.to(g.device).view(1, 1, N), float("-inf"))
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
    S = (initial_state.to(acc) if initial_state is not None
         else torch.zeros(B, H, D, E, dtype=acc, device=q.device))
    outs = []
    for c in range(nc):
        u = wv[:, :, c] - wk[:, :, c] @ S                      # (B, H, C, E)
        outs.append(scale * (pre[:, :, c].unsqueeze(-1) * (qc[:, :, c] @ S) + qk[:, :, c] @ u))
        S = pre[:, :, c, C - 1, None, None] * S + (suf[:, :, c].unsqueeze(-1) * kc[:, :, c]).transpose(-1, -2) @ u
    o = torch.cat(outs, dim=2)[:, :, :N] if nc else torch.zeros(B, H, 0, E, dtype=acc, device=q.device)
    o = o.to(q.dtype)
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, S) if output_final_state else o
