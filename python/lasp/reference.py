"""Pure-PyTorch references for ``lasp.lasp_attention`` (the math: docs/design.md).

Everything here is plain, slow, obviously-correct PyTorch, computed in float64 by default,
and differentiable with autograd (the tests take reference gradients from it). This module must
stay importable without the compiled extension: it imports nothing from the rest of ``lasp``.

The function, per batch ``b`` and query head ``h`` (kv head ``h // (H // Hkv)``), positions ``t``:

    o[t]        = scale * ( gamma^(t+1) q[t] S0 + sum_{s<=t} gamma^(t-s) (q[t].k[s]) v[s] )
    final_state = gamma^N S0 + sum_s gamma^(N-1-s) k[s]^T v[s]

with ``gamma = exp(-decay[h])`` (``decay=None``: gamma = 1) and ``S0 = initial_state[b, h]``
(``D x E``; ``None``: zeros).

Two independent formulations are given so that they can check each other:

* :func:`attention_ref` -- the direct masked sum ``((Q K^T) * M) V`` (quadratic in N).
* :func:`attention_recurrent_ref` -- the state recurrence ``S = gamma S + k^T v, o = scale q S``.
* :func:`attention_recurrent_grads` -- the same recurrence run forward and backward by hand (no
  autograd), token by token: outputs and every gradient at O(D E) memory per head, for long or wide
  problems.
* :func:`gated_recurrent_grads` -- the per-token gated recurrence with separate q, k and v head counts
  (value-head groups), forward and backward by hand, the gates' gradient included (see its docstring).
* :func:`gated_delta_recurrent` -- the gated delta rule (Gated DeltaNet), token by token, with head
  maps; gradients by autograd through the loop.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["attention_ref", "attention_recurrent_ref", "attention_recurrent_grads", "gated_recurrent_grads",
           "gated_delta_recurrent", "decay_matrix"]

_LAYOUTS = ("bhnd", "bnhd")


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"reference: unknown layout {layout!r} (expected one of {_LAYOUTS})")


def _to_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a (B, N, H, X) tensor as (B, H, N, X); identity for 'bhnd'."""
    return x if layout == "bhnd" else x.transpose(1, 2)


def _from_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhnd" else x.transpose(1, 2)


def _prepare(q, k, v, decay, scale, initial_state, layout, compute_dtype):
    _check_layout(layout)
    q = _to_bhnd(q, layout).to(compute_dtype)
    k = _to_bhnd(k, layout).to(compute_dtype)
    v = _to_bhnd(v, layout).to(compute_dtype)
    B, H, N, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    Bv, Hv, Nv, E = v.shape
    if not (B == Bk == Bv and N == Nk == Nv and D == Dk and Hkv == Hv):
        raise ValueError(
            f"reference: inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(all seen as (B, H, N, X))"
        )
    if H % Hkv != 0:
        raise ValueError(f"reference: H={H} is not a multiple of Hkv={Hkv}")
    group = H // Hkv
    # Query head h reads kv head h // group: repeat each kv head `group` times, consecutively.
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    # Decay rates are constants (the op refuses a decay that requires grad); keep them in
    # float64 whatever the compute dtype so that gamma^(t-s) itself is exact-ish.
    if decay is None:
        lam = torch.zeros(H, dtype=torch.float64, device=q.device)
    else:
        lam = decay.detach().to(device=q.device, dtype=torch.float64).reshape(H)
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, H, D, E):
            raise ValueError(
                f"reference: initial_state must have shape {(B, H, D, E)}, got {tuple(initial_state.shape)}"
            )
        s0 = initial_state.to(device=q.device, dtype=compute_dtype)
    else:
        s0 = None
    return q, k, v, lam, float(scale), s0, (B, H, N, D, E)


def decay_matrix(lam: torch.Tensor, N: int) -> torch.Tensor:
    """(H, N, N) float64 matrix M[h, t, s] = gamma_h^(t-s) for s <= t, 0 above the diagonal.

    Built as exp(-lambda * (t - s)) with the causal mask applied to the *exponent* (-inf above the
    diagonal) before exponentiating: for s > t, -lambda*(t-s) is positive and exp of it can overflow
    to inf, and inf * 0 would then poison the product with NaN.
    """
    lam = lam.to(torch.float64)
    idx = torch.arange(N, device=lam.device, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]  # t - s
    causal = diff >= 0
    expo = -lam[:, None, None] * diff  # (H, N, N)
    expo = torch.where(causal, expo, torch.full_like(expo, float("-inf")))
    return torch.exp(expo)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    layout: str = "bhnd",
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Direct masked-sum reference. Returns ``(o, final_state)`` in ``compute_dtype`` (float64).

    ``o`` is in ``layout`` ((B, H, N, E) or (B, N, H, E)); ``final_state`` is (B, H, D, E).

    ``compute_dtype`` other than float64 runs the same math with every tensor op in that dtype
    (the decay factors are formed in float64 and rounded once): this is the "reference in the
    op's own dtype" of flash-attention's tolerance rule, used to measure how much error the
    dtype itself forces.
    """
    q, k, v, lam, scale, s0, (B, H, N, D, E) = _prepare(
        q, k, v, decay, scale, initial_state, layout, compute_dtype
    )
    dev = q.device
    M = decay_matrix(lam.to(dev), N).to(compute_dtype)  # (H, N, N)
    scores = torch.matmul(q, k.transpose(-1, -2)) * M  # (B, H, N, N)
    o = torch.matmul(scores, v) * scale  # (B, H, N, E)
    pos = torch.arange(N, device=dev, dtype=torch.float64)
    # Weight of k[s]^T v[s] in the final state: gamma^(N-1-s).
    w_state = torch.exp(-lam[:, None] * (N - 1 - pos)[None, :]).to(compute_dtype)  # (H, N)
    final = torch.matmul((k * w_state[None, :, :, None]).transpose(-1, -2), v)  # (B, H, D, E)
    if s0 is not None:
        # Inter term: gamma^(t+1) q[t] S0;  final state: gamma^N S0.
        w_in = torch.exp(-lam[:, None] * (pos + 1)[None, :]).to(compute_dtype)  # (H, N)
        o = o + scale * torch.matmul(q * w_in[None, :, :, None], s0)
        final = final + torch.exp(-lam * N).to(compute_dtype)[None, :, None, None] * s0
    return _from_bhnd(o, layout), final


def attention_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    layout: str = "bhnd",
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """State-recurrence reference: ``S = gamma S + k[t]^T v[t]; o[t] = scale q[t] S``.

    Same signature and outputs as :func:`attention_ref`. Linear in N but with a Python loop over
    positions, so keep N modest.
    """
    q, k, v, lam, scale, s0, (B, H, N, D, E) = _prepare(
        q, k, v, decay, scale, initial_state, layout, compute_dtype
    )
    gamma = torch.exp(-lam).to(compute_dtype)[None, :, None, None]  # (1, H, 1, 1)
    S = s0 if s0 is not None else torch.zeros(B, H, D, E, dtype=compute_dtype, device=q.device)
    outs = []
    for t in range(N):
        S = gamma * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.matmul(q[:, :, t, None, :], S)[:, :, 0, :])
    if outs:
        o = torch.stack(outs, dim=2)
    else:
        o = q.new_zeros(B, H, 0, E)
    return _from_bhnd(o, layout), S


def attention_recurrent_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor],
    scale: Optional[float],
    initial_state: Optional[torch.Tensor],
    do: torch.Tensor,
    d_final: Optional[torch.Tensor] = None,
    layout: str = "bhnd",
) -> dict:
    """The op and its gradients from the token-by-token recurrences, in float64, without autograd.

    Forward: ``S[t] = gamma S[t-1] + k[t]^T v[t]`` (``S[-1]`` = initial state), ``o[t] = scale q[t] S[t]``.
    Backward, with ``R[t]`` the gradient of the loss with respect to ``S[t]``:
    ``R[N-1] = d_final + scale q[N-1]^T do[N-1]``, ``R[t] = gamma R[t+1] + scale q[t]^T do[t]``;
    ``dq[t] = scale do[t] S[t]^T``, ``dk[s] = v[s] R[s]^T``, ``dv[s] = k[s] R[s]``,
    ``d_initial_state = gamma R[0]``. With GQA, dk and dv sum over the query heads of each kv head.

    Returns a dict with ``o`` (in ``layout``), ``final_state``, ``dq``, ``dk``, ``dv`` (in ``layout``)
    and ``d_initial_state`` ((B, H, D, E); zeros when there is no initial state).
    """
    q, k_rep, v_rep, lam, scale, s0, (B, H, N, D, E) = _prepare(
        q, k, v, decay, scale, initial_state, layout, torch.float64
    )
    Hkv = _to_bhnd(k, layout).shape[1]
    group = H // Hkv
    do = _to_bhnd(do, layout).to(torch.float64)
    dev = q.device
    gamma = torch.exp(-lam).to(device=dev)[None, :, None, None]  # (1, H, 1, 1)
    S = s0.clone() if s0 is not None else torch.zeros(B, H, D, E, dtype=torch.float64, device=dev)
    o = torch.empty(B, H, N, E, dtype=torch.float64, device=dev)
    dq = torch.empty(B, H, N, D, dtype=torch.float64, device=dev)
    for t in range(N):
        S.mul_(gamma).addcmul_(k_rep[:, :, t, :, None], v_rep[:, :, t, None, :])
        torch.matmul(q[:, :, t, None, :], S, out=o[:, :, t, None, :])
        torch.matmul(do[:, :, t, None, :], S.transpose(-1, -2), out=dq[:, :, t, None, :])
    o.mul_(scale)
    dq.mul_(scale)
    final = S
    R = (
        d_final.to(device=dev, dtype=torch.float64).clone()
        if d_final is not None
        else torch.zeros(B, H, D, E, dtype=torch.float64, device=dev)
    )
    dk = torch.empty(B, H, N, D, dtype=torch.float64, device=dev)
    dv = torch.empty(B, H, N, E, dtype=torch.float64, device=dev)
    q_scaled = scale * q
    for s in range(N - 1, -1, -1):
        if s < N - 1:
            R.mul_(gamma)
        R.addcmul_(q_scaled[:, :, s, :, None], do[:, :, s, None, :])
        torch.matmul(v_rep[:, :, s, None, :], R.transpose(-1, -2), out=dk[:, :, s, None, :])
        torch.matmul(k_rep[:, :, s, None, :], R, out=dv[:, :, s, None, :])
    d_s0 = gamma * R if N > 0 else R
    # Per query head -> per kv head (query head h reads kv head h // group).
    dk = dk.reshape(B, Hkv, group, N, D).sum(2)
    dv = dv.reshape(B, Hkv, group, N, E).sum(2)
    return {
        "o": _from_bhnd(o, layout),
        "final_state": final,
        "dq": _from_bhnd(dq, layout),
        "dk": _from_bhnd(dk, layout),
        "dv": _from_bhnd(dv, layout),
        "d_initial_state": d_s0,
    }


def _output_heads(fn: str, Hq: int, Hk: int, Hv: int) -> int:
    """H = max(Hq, Hv), each of the three head counts dividing it (else a ValueError naming the tensor)."""
    H = max(Hq, Hv)
    for name, n in (("q", Hq), ("k", Hk), ("v", Hv)):
        if H % n != 0:
            raise ValueError(f"{fn}: {name} has {n} heads, which does not divide H = {H}")
    return H


def _to_output_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B, n, N, X) input heads -> (B, H, N, X) float64, output head h reading input head h // (H / n)."""
    return x.to(torch.float64).repeat_interleave(H // x.shape[1], dim=1)


def gated_recurrent_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    decay: Optional[torch.Tensor],
    scale: Optional[float],
    initial_state: Optional[torch.Tensor],
    do: torch.Tensor,
    d_final: Optional[torch.Tensor] = None,
) -> dict:
    """Per-token gates and head groups, forward and backward by hand, token by token, in float64
    (layout ``bhnd``; no autograd).

    Shapes: q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hv, N, E); output heads ``H = max(Hq, Hv)``, each of
    Hq, Hk, Hv dividing H; output head h reads q head ``h // (H / Hq)``, k head ``h // (H / Hk)`` and v
    head ``h // (H / Hv)``. g: (B, H, N) log gates (<= 0; ``-inf`` resets the state; None: zeros),
    decay: (H,) rates (None: zeros). With ``a[t] = exp(g[t] - decay[h])``:

        S[t] = a[t] S[t-1] + k[t]^T v[t]     (S[-1] = initial_state, (B, H, D, E); None: zeros)
        o[t] = scale q[t] S[t]

    Backward, with R[t] the gradient of the loss with respect to S[t]:
    ``R[N-1] = d_final + scale q[N-1]^T do[N-1]``, ``R[t] = a[t+1] R[t+1] + scale q[t]^T do[t]``;
    ``dq[t] = scale do[t] S[t]^T``, ``dk[t] = v[t] R[t]^T``, ``dv[t] = k[t] R[t]``,
    ``dg[t] = a[t] <R[t], S[t-1]>`` (Frobenius), ``d_initial_state = a[0] R[0]``. dq, dk, dv sum over the
    output heads that read each input head.

    Returns a dict with ``o`` (B, H, N, E), ``final_state``, ``dq``, ``dk``, ``dv`` (each in its input's
    shape), ``dg`` (B, H, N) and ``d_initial_state`` (zeros when there is no initial state).
    """
    f64 = torch.float64
    B, Hq, N, D = q.shape
    Hk, Hv, E = k.shape[1], v.shape[1], v.shape[3]
    H = _output_heads("gated_recurrent_grads", Hq, Hk, Hv)
    dev = q.device
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    qh, kh, vh = (_to_output_heads(x, H) for x in (q, k, v))
    dor = do.to(f64)
    lg = torch.zeros(B, H, N, dtype=f64, device=dev) if g is None else g.to(f64).clone()
    if decay is not None:
        lg = lg - decay.to(device=dev, dtype=f64)[None, :, None]
    a = torch.exp(lg)  # (B, H, N)
    S = (initial_state.to(f64).clone() if initial_state is not None
         else torch.zeros(B, H, D, E, dtype=f64, device=dev))
    prev = []  # S[t-1] for the gates' gradient
    o = torch.empty(B, H, N, E, dtype=f64, device=dev)
    dq = torch.empty(B, H, N, D, dtype=f64, device=dev)
    for t in range(N):
        prev.append(S.clone())
        S = a[:, :, t, None, None] * S + kh[:, :, t, :, None] * vh[:, :, t, None, :]
        o[:, :, t] = (qh[:, :, t, None, :] @ S)[:, :, 0]
        dq[:, :, t] = (dor[:, :, t, None, :] @ S.transpose(-1, -2))[:, :, 0]
    o.mul_(scale)
    dq.mul_(scale)
    final = S
    R = (d_final.to(device=dev, dtype=f64).clone() if d_final is not None
         else torch.zeros(B, H, D, E, dtype=f64, device=dev))
    dk = torch.empty(B, H, N, D, dtype=f64, device=dev)
    dv = torch.empty(B, H, N, E, dtype=f64, device=dev)
    dg = torch.zeros(B, H, N, dtype=f64, device=dev)
    for t in range(N - 1, -1, -1):
        if t < N - 1:
            R = a[:, :, t + 1, None, None] * R
        R = R + scale * qh[:, :, t, :, None] * dor[:, :, t, None, :]
        dk[:, :, t] = (vh[:, :, t, None, :] @ R.transpose(-1, -2))[:, :, 0]
        dv[:, :, t] = (kh[:, :, t, None, :] @ R)[:, :, 0]
        dg[:, :, t] = a[:, :, t] * (R * prev[t]).sum((-1, -2))
    d_s0 = a[:, :, 0, None, None] * R if N > 0 else R

    def reduce(x, n):  # output heads -> input heads
        return x.reshape(B, n, H // n, *x.shape[2:]).sum(2)

    return {
        "o": o,
        "final_state": final,
        "dq": reduce(dq, Hq),
        "dk": reduce(dk, Hk),
        "dv": reduce(dv, Hv),
        "dg": dg,
        "d_initial_state": d_s0,
    }


def gated_delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, token by token in float64 (layout ``bhnd``; differentiable by autograd).

    Shapes: q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hv, N, E); output heads ``H = max(Hq, Hv)``, each of Hq,
    Hk, Hv dividing H (head maps as in :func:`gated_recurrent_grads`); g, beta (B, H, N): per-token log decay
    (<= 0) and write strength. With ``a[t] = exp(g[t])`` and S (D x E):

        S[t] = a[t] (I - beta[t] k[t]^T k[t]) S[t-1] + beta[t] k[t]^T v[t],     o[t] = scale q[t] S[t]

    (``S[-1]`` = initial_state (B, H, D, E), None: zeros; scale None: D^-0.5). ``use_qk_l2norm``: q and k are
    first divided by sqrt(sum of squares + 1e-6) over D. This is fla's ``chunk_gated_delta_rule`` (and its
    ``naive_recurrent_gated_delta_rule``): the same recurrence with fla's layout (B, N, H, .) for q, k, v,
    g, beta and (B, H, D, E) for the state. Returns (o (B, H, N, E), final_state (B, H, D, E)).
    """
    f64 = torch.float64
    B, Hq, N, D = q.shape
    Hk, Hv, E = k.shape[1], v.shape[1], v.shape[3]
    H = _output_heads("gated_delta_recurrent", Hq, Hk, Hv)
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, H, N):
            raise ValueError(f"gated_delta_recurrent: {name} must have shape (B, H, N) = {(B, H, N)}, got "
                             f"{tuple(x.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    qh, kh, vh = (_to_output_heads(x, H) for x in (q, k, v))
    if use_qk_l2norm:
        qh = qh / torch.sqrt((qh * qh).sum(-1, keepdim=True) + 1e-6)
        kh = kh / torch.sqrt((kh * kh).sum(-1, keepdim=True) + 1e-6)
    a, bt = torch.exp(g.to(f64)), beta.to(f64)
    S = (initial_state.to(f64) if initial_state is not None
         else torch.zeros(B, H, D, E, dtype=f64, device=q.device))
    outs = []
    for t in range(N):
        kt, vt = kh[:, :, t], vh[:, :, t]  # (B, H, D), (B, H, E)
        S = a[:, :, t, None, None] * S
        u = bt[:, :, t, None] * (vt - (kt[..., None] * S).sum(-2))  # beta (v - k S), (B, H, E)
        S = S + kt[..., None] * u[..., None, :]
        outs.append(scale * (qh[:, :, t, :, None] * S).sum(-2))
    o = torch.stack(outs, dim=2) if N > 0 else torch.zeros(B, H, 0, E, dtype=f64, device=q.device)
    return o, S
