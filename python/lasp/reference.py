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
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["attention_ref", "attention_recurrent_ref", "decay_matrix"]

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
