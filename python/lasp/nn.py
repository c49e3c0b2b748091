"""Modules built on ``lasp.lasp_attention``: a TransNormerLLM-style linear-attention layer.

:class:`LinearAttention` maps ``(B, N, hidden)`` to ``(B, N, hidden)``:

    q = phi(x Wq), k = phi(x Wk), v = x Wv               (phi: the feature map; k, v with num_kv_heads heads)
    o = lasp_attention(q, k, v, decay, scale, group)    (causal, decayed, sequence-parallel over group)
    o = norm_h(o) * gate(x Wg)                          (per-head RMSNorm and output gate, as TransNormerLLM)
    y = o Wo

Under a sequence-parallel group, every rank passes its contiguous piece of the sequence and the
module runs the LASP state ring inside the op; everything else in the layer is per token, so no
other communication is needed. Parameters are replicated over the group: sum their gradients over
it (see ``examples/train.py``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import alibi_slopes, lasp_attention

__all__ = ["LinearAttention", "HeadRMSNorm", "FEATURE_MAPS"]


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


FEATURE_MAPS: dict = {
    "silu": F.silu,  # TransNormerLLM / Lightning Attention
    "elu1": _elu1,  # Katharopoulos et al. (positive)
    "relu": F.relu,
    None: None,  # identity
    "none": None,
    "identity": None,
}

_GATES = {"sigmoid": torch.sigmoid, "silu": F.silu, "swish": F.silu}


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's channels of a (..., H * E) tensor, with one weight per channel
    (GroupNorm-style with H groups and no mean subtraction). Computed in float32."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.float().reshape(*shape[:-1], self.num_heads, self.head_dim)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf.reshape(shape) * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"


class LinearAttention(nn.Module):
    """Causal linear attention with per-head decay, GQA, output norm and gate; sequence-parallel.

    Args:
        hidden_size: model width (input and output features).
        num_heads: query heads H.
        num_kv_heads: key/value heads (default H); H must be a multiple (GQA / MQA).
        head_dim: q/k head dim D (default hidden_size // num_heads).
        value_dim: v/o head dim E (default D).
        feature_map: "silu" (default), "elu1", "relu" or None, applied to q and k.
        decay: "alibi" (``lasp.alibi_slopes(H)``), None (no decay) or a float tensor (H,) of rates
            lambda >= 0 (gamma = exp(-lambda)). Kept as a float32 buffer (also after ``.to(bf16)``).
        output_norm: per-head RMSNorm of the attention output (TransNormerLLM's normalisation).
        output_gate: True/"sigmoid", "silu" or False: multiply the normalised output by
            gate(x Wg) before the output projection (TransNormerLLM's gate).
        state_gate: per-token gates of the state (the op's ``g``, one per head and token), or None:
            "logsigmoid" (GLA-style: g = logsigmoid(x W_gk + b) / gate_logit_normalizer) or "mamba2"
            (Mamba-2's SSD: g = -exp(A_log) * softplus(x W_dt + dt_bias), with A_log and dt_bias per
            head). The gates add to the decay (``g - decay``); pass decay=None for gates alone.
        gate_logit_normalizer: the divisor of the "logsigmoid" gates.
        bias: biases on the projections.
        scale: attention scale (default 1/sqrt(D), the op's default).
        sp_group: default sequence-parallel process group (a call's ``sp_group`` overrides it).
        sp_strategy: how the op passes states across the group: "ring" (default), "allgather", "scan" or
            "auto" (``lasp_attention``'s ``strategy``).
        norm_eps: epsilon of the output norm.

    ``attn_impl``: an optional callable ``(q, k, v, decay, scale, group) -> o`` on (B, N, H, *)
    tensors that replaces ``lasp_attention`` (used by ``benchmarks/bench_model.py`` to put other
    sequence-parallel methods in the same model); None uses the LASP op.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        value_dim: Optional[int] = None,
        feature_map: Optional[str] = "silu",
        decay: Union[str, None, torch.Tensor] = "alibi",
        output_norm: bool = True,
        output_gate: Union[bool, str] = True,
        bias: bool = False,
        scale: Optional[float] = None,
        sp_group=None,
        sp_strategy: str = "ring",
        norm_eps: float = 1e-6,
        state_gate: Optional[str] = None,
        gate_logit_normalizer: float = 16.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"LinearAttention: num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"LinearAttention: hidden_size ({hidden_size}) is not divisible by num_heads ({num_heads}); pass head_dim"
                )
            head_dim = hidden_size // num_heads
        value_dim = head_dim if value_dim is None else value_dim
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"LinearAttention: feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
        if output_gate is True:
            output_gate = "sigmoid"
        if output_gate and output_gate not in _GATES:
            raise ValueError(f"LinearAttention: output_gate must be a bool or one of {list(_GATES)}, got {output_gate!r}")
        if state_gate not in (None, "logsigmoid", "mamba2"):
            raise ValueError(f"LinearAttention: state_gate must be None, 'logsigmoid' or 'mamba2', got {state_gate!r}")
        from .distributed import STRATEGY_CHOICES

        if sp_strategy not in STRATEGY_CHOICES:
            raise ValueError(f"LinearAttention: sp_strategy must be one of {STRATEGY_CHOICES}, got {sp_strategy!r}")
        if not gate_logit_normalizer > 0:
            raise ValueError(f"LinearAttention: gate_logit_normalizer must be > 0, got {gate_logit_normalizer!r}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.value_dim = head_dim, value_dim
        self.feature_map_name = feature_map
        self.feature_map = FEATURE_MAPS[feature_map]
        self.scale = scale
        self.sp_group = sp_group
        self.sp_strategy = sp_strategy
        self.gate_name = output_gate or None
        self.attn_impl: Optional[Callable] = None
        fk = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * value_dim, bias=bias, **fk)
        self.g_proj = nn.Linear(hidden_size, num_heads * value_dim, bias=bias, **fk) if output_gate else None
        self.o_norm = HeadRMSNorm(num_heads, value_dim, eps=norm_eps, **fk) if output_norm else None
        self.o_proj = nn.Linear(num_heads * value_dim, hidden_size, bias=bias, **fk)
        self.state_gate, self.gate_logit_normalizer = state_gate, float(gate_logit_normalizer)
        if state_gate == "logsigmoid":
            self.gk_proj = nn.Linear(hidden_size, num_heads, bias=True, **fk)
        elif state_gate == "mamba2":
            self.dt_proj = nn.Linear(hidden_size, num_heads, bias=False, **fk)
            # Mamba-2's initialisation: A in [1, 16], dt log-uniform in [1e-3, 1e-1] through softplus.
            pk = dict(device=device, dtype=torch.float32)
            self.A_log = nn.Parameter(torch.log(torch.empty(num_heads, **pk).uniform_(1.0, 16.0)))
            dt = torch.exp(torch.empty(num_heads, **pk).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

        dev = self.q_proj.weight.device
        if isinstance(decay, str):
            if decay != "alibi":
                raise ValueError(f"LinearAttention: decay must be 'alibi', None or a tensor (H,), got {decay!r}")
            rates = alibi_slopes(num_heads).to(device=dev)
        elif decay is None:
            rates = None
        elif isinstance(decay, torch.Tensor):
            if decay.numel() != num_heads:
                raise ValueError(
                    f"LinearAttention: decay must have num_heads ({num_heads}) entries, got shape {tuple(decay.shape)}"
                )
            rates = decay.detach().reshape(num_heads).to(device=dev, dtype=torch.float32).clone()
        else:
            raise TypeError(f"LinearAttention: decay must be 'alibi', None or a tensor, got {type(decay).__name__}")
        self.register_buffer("decay", rates)

    def _apply(self, fn, recurse=True):
        # The decay rates are constants of the function: keep them float32 when the module is cast
        # to a low-precision dtype (rounding ALiBi slopes to bf16 would change the model).
        d = self._buffers.get("decay")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("decay")
        if d is not None and new is not None and new.dtype != torch.float32:
            self._buffers["decay"] = d.float().to(device=new.device) if d.device.type != "meta" else new.float()
        return out

    def forward(
        self,
        x: torch.Tensor,
        initial_state: Optional[torch.Tensor] = None,
        output_final_state: bool = False,
        sp_group=None,
    ):
        """x: (B, N, hidden), this rank's piece of the sequence under a group.

        initial_state: (B, H, D, E) float32 state before the sequence (rank 0's is read under a
        group). Returns y (B, N, hidden), or (y, final_state) with output_final_state.
        """
        q, k, v = self.project(x)
        g = self.gates(x)
        final_state = None
        if initial_state is None and not output_final_state:
            o = self.attend(q, k, v, sp_group, g=g)
        elif self.attn_impl is not None:
            raise ValueError("LinearAttention: states are not supported with a custom attn_impl")
        else:
            group = sp_group if sp_group is not None else self.sp_group
            res = lasp_attention(
                q, k, v, self._decay_rates(), g=g, scale=self.scale, group=group, initial_state=initial_state,
                output_final_state=output_final_state, layout="bnhd", strategy=self.sp_strategy,
            )
            o, final_state = res if output_final_state else (res, None)
        y = self.output(o, x)
        return (y, final_state) if output_final_state else y

    # The three stages of ``forward``, for callers that fuse the per-token ones (``lasp.models`` compiles
    # ``project`` and ``output`` with the norms and residuals around them when asked to).

    def project(self, x: torch.Tensor):
        """x (B, N, hidden) -> q (B, N, H, D), k (B, N, Hkv, D), v (B, N, Hkv, E), feature map applied."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.value_dim)
        if self.feature_map is not None:
            q, k = self.feature_map(q), self.feature_map(k)
        return q, k, v

    def gates(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x (B, N, hidden) -> the per-token log gates g (B, N, H) in float32 (float64 for float64 x)
        (state_gate), or None."""
        ct = torch.promote_types(x.dtype, torch.float32)
        if self.state_gate == "logsigmoid":
            return F.logsigmoid(self.gk_proj(x).to(ct)) / self.gate_logit_normalizer
        if self.state_gate == "mamba2":
            return -torch.exp(self.A_log.to(ct)) * F.softplus(self.dt_proj(x).to(ct) + self.dt_bias.to(ct))
        return None

    def _decay_rates(self):
        decay = self.decay
        return decay.float() if decay is not None and decay.dtype != torch.float32 else decay

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp_group=None,
               g: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention itself (``attn_impl`` if set, else ``lasp_attention``), o (B, N, H, E); g: the
        gates of ``gates(x)`` (B, N, H), or None."""
        group = sp_group if sp_group is not None else self.sp_group
        if self.attn_impl is not None:
            if g is not None:
                raise ValueError("LinearAttention: state gates are not supported with a custom attn_impl")
            return self.attn_impl(q, k, v, self._decay_rates(), self.scale, group)
        return lasp_attention(q, k, v, self._decay_rates(), g=g, scale=self.scale, group=group, layout="bnhd",
                              strategy=self.sp_strategy)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o (B, N, H, E) and the layer input x -> y (B, N, hidden): output norm, gate, projection."""
        B, N = o.shape[:2]
        o = o.reshape(B, N, self.num_heads * self.value_dim)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.g_proj is not None:
            o = o * _GATES[self.gate_name](self.g_proj(x))
        return self.o_proj(o)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
            f"feature_map={self.feature_map_name}, decay={'none' if self.decay is None else 'per-head'}, "
            f"gate={self.gate_name}, state_gate={self.state_gate}, scale={self.scale}"
        )
