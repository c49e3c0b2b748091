"""A small TransNormerLLM-style causal language model on ``lasp.nn.LinearAttention``.

    x = embed(input_ids)
    for each layer:  x = x + attn(norm(x));  x = x + glu_mlp(norm(x))
    loss = cross_entropy(lm_head(norm(x)), labels)     (chunked over tokens; by default the gradient
                                                        is computed with the loss, see fused_loss)

Sequence parallelism: pass ``sp_group`` to ``forward`` with this rank's contiguous piece of each
sequence (``input_ids`` and ``labels``, labels already shifted: ``labels[:, t]`` is the target of
position t, -100 ignored). Everything but the attention ring is per token. The returned loss is the
sum over this rank's tokens divided by ``loss_normalizer`` (default: the number of valid labels of the
whole sequence, over the group), so the sum of the ranks' losses is the loss of the whole sequence and
the sum of their gradients is its gradient.

Presets: ``LaspConfig.tiny()`` (tests), ``.small()`` (~150M), ``.b1()`` (~1B parameters).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .nn import LinearAttention
from ._ops import alibi_slopes

__all__ = ["LaspConfig", "LaspForCausalLM", "LaspBlock", "GLUMLP", "CausalLMOutput", "chunked_cross_entropy",
           "fused_linear_cross_entropy"]

IGNORE_INDEX = -100


@dataclass
class LaspConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: Optional[int] = None  # None: = num_heads (MHA)
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    value_dim: Optional[int] = None  # None: head_dim
    mlp_ratio: float = 8.0 / 3.0  # GLU intermediate = mlp_ratio * hidden, rounded up to mlp_multiple_of
    mlp_multiple_of: int = 64
    mlp_act: str = "silu"  # GLU activation: "silu" (SwiGLU) or "gelu" (GeGLU)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-6
    feature_map: Optional[str] = "silu"
    decay: Optional[str] = "alibi_layer"  # "alibi_layer" (TransNormerLLM: slopes scaled per layer), "alibi", None
    output_norm: bool = True
    output_gate: object = True
    # Per-token state gates (LinearAttention's state_gate): None, "logsigmoid" (GLA-style) or "mamba2" (Mamba-2's
    # -exp(A_log) softplus(dt)); they add to the decay (set decay=None for gates alone: LaspConfig.gated).
    state_gate: Optional[str] = None
    # How each layer's op passes states across the sequence-parallel group: "ring", "allgather", "scan" or
    # "auto" (lasp_attention's strategy).
    sp_strategy: str = "ring"
    bias: bool = False
    attn_scale: Optional[float] = None  # None: 1/sqrt(head_dim)
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    loss_chunk_size: int = 4096  # tokens per cross-entropy chunk (peak logits memory: chunk x vocab)
    checkpoint_layers: bool = False  # activation checkpointing of every layer
    # Training loss through fused_linear_cross_entropy: each chunk's logits give the loss and their
    # gradient at once, so backward does no logits matmul or softmax again (False: chunked_cross_entropy,
    # which recomputes each chunk in backward). Without gradients the plain chunked loss runs.
    fused_loss: bool = True
    # Fuse the per-token work around each attention call (norms, projections' epilogues, feature map,
    # output norm and gate, residuals, GLU) and the loss chunks with torch.compile (inductor). The op
    # and its ring stay outside the compiled graphs. The first steps at a new length compile (tens of
    # seconds); the results match the eager model up to the rounding of fused float ops.
    compile: bool = False

    @classmethod
    def tiny(cls, **kw) -> "LaspConfig":
        base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_ratio=2.0,
                    mlp_multiple_of=8, loss_chunk_size=64)
        base.update(kw)
        return cls(**base)

    @classmethod
    def gated(cls, **kw) -> "LaspConfig":
        """Mamba-2-style gates in place of the fixed decay (state_gate="mamba2", decay=None); other fields as
        given (e.g. ``LaspConfig.gated(**dataclasses.asdict(LaspConfig.tiny()))``)."""
        base = dict(state_gate="mamba2", decay=None)
        base.update(kw)
        return cls(**base)

    @classmethod
    def small(cls, **kw) -> "LaspConfig":
        base = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12)
        base.update(kw)
        return cls(**base)

    @classmethod
    def b1(cls, **kw) -> "LaspConfig":
        # ~1.0B: 16 layers x (5 x 2048^2 attention + 3 x 2048 x 5504 GLU) + 2 x 32000 x 2048 embeddings.
        base = dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16)
        base.update(kw)
        return cls(**base)

    @property
    def intermediate_size(self) -> int:
        m = self.mlp_multiple_of
        return int(math.ceil(self.mlp_ratio * self.hidden_size / m) * m)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _make_norm(cfg: LaspConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    raise ValueError(f"LaspConfig: norm must be 'rmsnorm' or 'layernorm', got {cfg.norm!r}")


class GLUMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        acts = {"silu": F.silu, "gelu": F.gelu}
        if act not in acts:
            raise ValueError(f"GLUMLP: act must be one of {list(acts)}, got {act!r}")
        self.act = acts[act]
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def layer_decay(cfg: LaspConfig, layer_idx: int) -> Optional[torch.Tensor]:
    """Decay rates of one layer: TransNormerLLM scales the ALiBi slopes by (1 - l / (L - 1) + 1e-5),
    so early layers forget fast and the last layer hardly decays."""
    if cfg.decay is None:
        return None
    s = alibi_slopes(cfg.num_heads)
    if cfg.decay == "alibi":
        return s
    if cfg.decay == "alibi_layer":
        frac = layer_idx / (cfg.num_layers - 1) if cfg.num_layers > 1 else 0.0
        return s * (1.0 - frac + 1e-5)
    raise ValueError(f"LaspConfig: decay must be 'alibi_layer', 'alibi' or None, got {cfg.decay!r}")


class LaspBlock(nn.Module):
    def __init__(self, cfg: LaspConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = _make_norm(cfg)
        decay = layer_decay(cfg, layer_idx)
        self.attn = LinearAttention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.value_dim,
            feature_map=cfg.feature_map, decay=decay, output_norm=cfg.output_norm, output_gate=cfg.output_gate,
            bias=cfg.bias, scale=cfg.attn_scale, norm_eps=cfg.norm_eps, state_gate=cfg.state_gate,
            sp_strategy=cfg.sp_strategy,
        )
        self.mlp_norm = _make_norm(cfg)
        self.mlp = GLUMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_act, cfg.bias)

    # forward = attn_in -> attention (the op, with its ring) -> attn_out_mlp. The two per-token stages are
    # what ``compile`` fuses; they are methods so that every layer shares one compiled graph of each.

    def attn_in(self, x):
        h = self.attn_norm(x)
        q, k, v = self.attn.project(h)
        return h, q, k, v, self.attn.gates(h)

    def attn_out_mlp(self, x, h, o):
        x = x + self.attn.output(o, h)
        return x + self.mlp(self.mlp_norm(x))

    # Compiled attn_in / attn_out_mlp, set by fuse(). They wrap the class's functions, not this module's
    # bound methods, and take the module as an argument: a deep copy of the model runs its own weights.
    _fused_in = None
    _fused_out = None

    def forward(self, x, sp_group=None, resets=None):
        """resets: None, or (B, n, 1) log gates, -inf at the tokens that start a document (0 elsewhere)."""
        h, q, k, v, g = self._fused_in(self, x) if self._fused_in is not None else self.attn_in(x)
        if resets is not None:
            g = resets.expand(-1, -1, self.attn.num_heads) if g is None else g + resets
        o = self.attn.attend(q, k, v, sp_group, g=g)
        return self._fused_out(self, x, h, o) if self._fused_out is not None else self.attn_out_mlp(x, h, o)

    def fuse(self, compiler):
        """Run the two per-token stages through ``compiler`` (e.g. ``torch.compile``)."""
        self._fused_in = compiler(LaspBlock.attn_in)
        self._fused_out = compiler(LaspBlock.attn_out_mlp)


def _loss_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs


def _ce_chunk(h, weight, labels):
    logits = F.linear(h, weight)
    logits = logits.to(_loss_dtype(logits.dtype))
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _ce_loss_grad(logits, labels):
    """One chunk: (sum of cross-entropy over valid labels in float32 (float64 for float64 logits),
    d(sum)/d(logits) in logits' dtype)."""
    lf = logits.to(_loss_dtype(logits.dtype))
    valid = labels != IGNORE_INDEX
    y = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(lf, dim=-1)
    loss = torch.where(valid, lse - lf.gather(1, y).squeeze(1), 0.0).sum()
    grad = torch.exp(lf - lse.unsqueeze(1))
    grad = grad - (torch.arange(lf.shape[1], device=lf.device) == y).to(lf.dtype)
    grad = grad * valid.unsqueeze(1).to(lf.dtype)
    return loss, grad.to(logits.dtype)


def _mm_acc(a, b, acc_dtype):
    """a @ b accumulated and returned in acc_dtype (16-bit CUDA inputs: fp32 output straight from the GEMM)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and acc_dtype == torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(acc_dtype)


class _FusedLinearCE(torch.autograd.Function):
    """sum_t cross_entropy(hidden[t] @ weight^T, labels[t]); forward also computes both gradients, chunk
    by chunk, and backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, dtype, grad_fn):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = (hidden.dtype, weight.dtype)
        dev = hidden.device.type
        with torch.autocast(dev, enabled=False):
            h_all = hidden.to(dtype)
            w = weight.to(dtype)
            dh = torch.empty(h_all.shape, dtype=dtype, device=h_all.device) if need_h else None  # contiguous: mm(out=) slices
            acc = _loss_dtype(weight.dtype)
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=_loss_dtype(dtype), device=hidden.device)
            for s in range(0, h_all.shape[0], chunk_size):
                h, y = h_all[s:s + chunk_size], labels[s:s + chunk_size]
                loss, g = grad_fn(torch.mm(h, w.t()), y)
                total += loss
                if need_h:
                    torch.mm(g, w, out=dh[s:s + chunk_size])
                if need_w:
                    dw += _mm_acc(g.t(), h, acc)
        ctx.save_for_backward(dh, dw)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (dh * grad.to(dh.dtype)).to(h_dtype) if dh is not None else None
        gw = (dw * grad).to(w_dtype) if dw is not None else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_size: int = 4096, grad_fn=None) -> torch.Tensor:
    """What ``chunked_cross_entropy`` returns (a float32 sum over tokens, labels == -100 ignored), for
    training: each chunk's ``chunk_size x vocab`` logits give the loss and, at once, the gradients of
    ``hidden`` and ``weight``, which forward keeps (``hidden``'s size, and ``weight``'s in float32, summed
    over chunks in float32) and
    backward scales by the loss's gradient. So backward runs no logits matmul or softmax, and forward
    runs two more matmuls per chunk (three in all, against four with recomputation). Under autocast the
    matmuls run in the autocast dtype, else in the promoted dtype of ``hidden`` and ``weight``; logits
    and softmax are float32 (float64 for float64 inputs), their gradient is rounded to the matmul dtype
    (as autograd of the plain loss does). Not twice differentiable. Without gradients it is
    ``chunked_cross_entropy``.

    grad_fn: ``(logits, labels) -> (loss sum, d loss / d logits)`` for one chunk (default: eager; the
    model passes a compiled one under ``LaspConfig.compile``).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden (T, C) and weight (V, C) must share C, got "
                         f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: labels must have shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64 or labels.device != hidden.device:
        raise ValueError(f"fused_linear_cross_entropy: labels must be int64 on {hidden.device} (hidden's device), "
                         f"got {labels.dtype} on {labels.device}")
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    needs = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs or hidden.shape[0] == 0:
        return chunked_cross_entropy(hidden, weight, labels, chunk_size, recompute=False)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return _FusedLinearCE.apply(hidden, weight, labels, chunk_size, dtype, grad_fn or _ce_loss_grad)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 4096, recompute: bool = True, chunk_fn=None) -> torch.Tensor:
    """sum_t cross_entropy(hidden[t] @ weight^T, labels[t]) (labels == -100 ignored), never holding
    more than ``chunk_size x vocab`` logits: each chunk's logits are computed in float32, reduced to
    a scalar and freed; with ``recompute`` (activation checkpointing per chunk) backward computes
    them again chunk by chunk instead of keeping them.

    hidden: (T, C); weight: (V, C); labels: (T,) int64. Returns a float32 scalar (float64 for float64
    inputs; a sum, not a mean).
    chunk_fn: what computes one chunk's sum (default: linear, float32 cast, cross_entropy; the model
    passes a compiled one under ``LaspConfig.compile``).
    """
    chunk_fn = chunk_fn or _ce_chunk
    T = hidden.shape[0]
    if T == 0:
        return hidden.new_zeros((), dtype=torch.float32) + 0.0 * weight.sum()
    total = None
    for s in range(0, T, chunk_size):
        h, y = hidden[s:s + chunk_size], labels[s:s + chunk_size]
        if recompute and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            part = checkpoint(chunk_fn, h, weight, y, use_reentrant=False)
        else:
            part = chunk_fn(h, weight, y)
        total = part if total is None else total + part
    return total


@dataclass
class CausalLMOutput:
    loss: Optional[torch.Tensor] = None  # sum of this rank's token losses / loss_normalizer
    logits: Optional[torch.Tensor] = None  # (B, n, V), only when asked for
    num_tokens: Optional[torch.Tensor] = None  # valid labels on this rank
    hidden_states: Optional[torch.Tensor] = None  # final-norm output (B, n, C), only when asked for


class LaspForCausalLM(nn.Module):
    def __init__(self, config: LaspConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LaspBlock(config, i) for i in range(config.num_layers))
        self.norm = _make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = config.checkpoint_layers
        self._ce_fn = None
        self._ce_grad_fn = None
        if config.compile:
            self.fuse()
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def fuse(self, compiler=None):
        """Compile each layer's per-token stages and the loss chunk (``LaspConfig.compile`` calls
        this; ``compiler`` defaults to ``torch.compile(fullgraph=True)``). Every layer shares the
        compiled graphs; the attention op and its ring run between them, uncompiled."""
        if compiler is None:
            compiler = functools.partial(torch.compile, fullgraph=True)
        for layer in self.layers:
            layer.fuse(compiler)
        self._ce_fn = compiler(_ce_chunk)
        self._ce_grad_fn = compiler(_ce_loss_grad)

    @torch.no_grad()
    def reset_parameters(self, seed: Optional[int] = None):
        """Normal(0, initializer_range) weights; output projections (attention o_proj, MLP down_proj)
        scaled by 1/sqrt(2 * num_layers); norms to one, biases to zero."""
        g = None
        if seed is not None:
            g = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                mod.weight.normal_(0.0, s, generator=g)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0.0, std, generator=g)
            elif isinstance(mod, (nn.RMSNorm, nn.LayerNorm)) or type(mod).__name__ == "HeadRMSNorm":
                if getattr(mod, "weight", None) is not None:
                    mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        sp_group=None,
        loss_normalizer=None,
        return_logits: bool = False,
        return_hidden_states: bool = False,
        doc_starts: Optional[torch.Tensor] = None,
    ) -> CausalLMOutput:
        """input_ids, labels: (B, n) int64, this rank's piece of each sequence under ``sp_group``;
        labels already shifted (labels[:, t] is the target of position t; -100 ignored).

        loss_normalizer: number (or tensor) to divide the summed token loss by. Default: the number
        of valid labels over the whole sequence (all-reduced over ``sp_group``), i.e. the sum of the
        ranks' losses is the mean over the sequence. (With data parallelism on top, pass the count
        that makes your reduction exact; ``examples/train.py`` does.)

        doc_starts: None, or (B, n) bool marking this rank's tokens that start a document of a packed row
        (a document starting on this piece's first token included): every layer's state resets there, so no
        document sees another (across ranks too). Mask the labels that cross a boundary yourself (-100).
        """
        resets = None
        if doc_starts is not None:
            if doc_starts.shape != input_ids.shape or doc_starts.dtype != torch.bool:
                raise ValueError(f"LaspForCausalLM: doc_starts must be a bool tensor of the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {doc_starts.dtype} {tuple(doc_starts.shape)}")
            resets = torch.zeros(*doc_starts.shape, 1, dtype=torch.float32, device=input_ids.device)
            resets.masked_fill_(doc_starts[..., None], float("-inf"))
        x = self.embed_tokens(input_ids)
        extra = {} if resets is None else {"resets": resets}  # (layers wrapped without it still run unpacked)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, sp_group, use_reentrant=False, **extra)
            else:
                x = layer(x, sp_group=sp_group, **extra)
        h = self.norm(x)
        out = CausalLMOutput()
        if return_hidden_states:
            out.hidden_states = h
        if return_logits:
            out.logits = F.linear(h, self.output_weight)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"LaspForCausalLM: labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            flat = labels.reshape(-1)
            count = (flat != IGNORE_INDEX).sum()
            out.num_tokens = count
            if loss_normalizer is None:
                norm = count.detach().clone()
                if sp_group is not None:
                    import torch.distributed as dist

                    dist.all_reduce(norm, group=sp_group)
                loss_normalizer = norm.clamp_min(1).float()
            hf = h.reshape(-1, h.shape[-1])
            if self.config.fused_loss and torch.is_grad_enabled():
                loss_sum = fused_linear_cross_entropy(hf, self.output_weight, flat, self.config.loss_chunk_size,
                                                      grad_fn=self._ce_grad_fn)
            else:
                loss_sum = chunked_cross_entropy(hf, self.output_weight, flat, self.config.loss_chunk_size,
                                                 chunk_fn=self._ce_fn)
            out.loss = loss_sum / loss_normalizer
        return out
