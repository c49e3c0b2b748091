"""Gated DeltaNet models of HuggingFace transformers on lasp: Qwen3-Next, Qwen3.5 (and Qwen3.5-MoE), OLMo hybrid.

``patch_gated_deltanet(model, sp_group=None)`` (also reached through ``lasp.integrations.hf.patch``) swaps the
forward of every Gated DeltaNet layer of the model (``Qwen3NextGatedDeltaNet``, ``Qwen3_5GatedDeltaNet``,
``Qwen3_5MoeGatedDeltaNet``, ``OlmoHybridGatedDeltaNet``) for one that computes the delta rule with
``lasp.gated_delta_attention``, in place; ``lasp.integrations.hf.unpatch`` restores transformers' own code.

What the patched layer computes is the layer's own function:

* the projections, the padding mask, the SiLU of the short causal convolution, the gated RMSNorm and the
  output projection are the model's own modules and parameters, called as transformers calls them; the
  log decay ``g = -exp(A_log) * softplus(a + dt_bias)`` and ``beta = sigmoid(b)`` (OLMo hybrid: times 2 with
  ``linear_allow_neg_eigval``) are computed by the same expressions;
* the delta rule is ``gated_delta_attention(q, k, v, g, beta, layout="bnhd", use_qk_l2norm=True)``
  (transformers' ``torch_chunk_gated_delta_rule`` / fla's ``chunk_gated_delta_rule``, scale ``Dk^-0.5``).
  q and k keep their ``linear_num_key_heads`` heads: lasp maps output head ``h`` to key head
  ``h // (Hv / Hk)``, which is what transformers' ``repeat_interleave`` does, without the copies. lasp computes
  in float64 for float64 models (transformers' torch path computes the delta rule in float32 whatever the
  model's dtype) and in float32 otherwise.

Sequence parallelism (``sp_group``): group rank ``r`` feeds the model the ``r``-th contiguous piece of every
sequence. The delta rule passes its state along the group (lasp's ring). The depthwise causal convolution
(kernel ``K = linear_conv_kernel_dim``) of a piece's first ``K - 1`` tokens reads the ``K - 1`` tokens before
the piece: a halo exchange hands each rank those tokens' pre-convolution features (``(B, C, K - 1)``, ``C``
= the q, k, v channels) from the ranks that hold them: the previous rank, or several earlier ones where
pieces are shorter than ``K - 1`` (empty pieces take part in nothing). It is one round of point-to-point
messages, planned from the pieces' lengths (agreed by the model's pre-forward hook), and differentiable:
its backward returns the halo's gradient to the ranks that sent it. The hybrids' softmax-attention layers
are swapped under a group too and stay exact as in the MiniMax integration (K and V all-gathered, the causal
mask over global positions); position ids default to the global positions. Under a group there is no cache,
and a padding mask is refused where the model has full-attention layers; these refusals are agreed over the
group before the first collective, so every rank raises alike. Every rank must run the backward (the state
and halo chains pass through every rank).

Packed documents (several documents in one row): told apart by position ids that restart (transformers'
rule), or by ``cu_seq_lens_q`` (global offsets under a group), as in the MiniMax integration. The patched
layers restart both the delta-rule state (``g = -inf`` at a document's first token) and the convolution (no
tap reads a token of another document, across rank boundaries too) at every document start; transformers'
own GatedDeltaNet torch path does neither.

Generation without a group: a call with a cache runs lasp for the prefill (the cache is then filled as
transformers fills it: the convolution's input window and the delta rule's final state, in float32 as
transformers keeps it); a call continuing from a cache that already holds this layer's state (decode steps
and chunked prefill) runs transformers' own forward of the layer, which is how a cached continuation is
defined there.

Versions: the code reproduced here was read from transformers 5.17.0 and checked against 5.22.2 (the two
releases CI runs; the layers' forwards differ only in how they read the cache). Each release has sha256
fingerprints of the reproduced functions; another version, or one whose source differs, raises an error
naming the supported ones (``allow_untested_version=True`` skips those two checks, not the structural ones).
"""
from __future__ import annotations

import functools
import importlib
import inspect

import torch
import torch.nn.functional as F

from .. import gated_delta_attention
from . import hf as _hf
from .hf import (_CALL_OK, _PATCH_ATTR, _SpGroup, _agree_call, _call_documents, _check_strategy, _doc_starts, _err,
                 _group_rank_size, _hook_call, _layer_documents, _settle_call, _sp_sdpa)

__all__ = ["patch_gated_deltanet", "unpatch_gated_deltanet", "FAMILIES", "SUPPORTED_TRANSFORMERS"]

# family -> transformers module, the Gated DeltaNet layer class, the softmax-attention class, the decoder
# stack the pre-forward hook sits on, and (where there is one) the vision-language wrapper model.
FAMILIES = {
    "qwen3_next": dict(module="qwen3_next.modeling_qwen3_next", layer="Qwen3NextGatedDeltaNet",
                       attention="Qwen3NextAttention", model="Qwen3NextModel", vl=None),
    "qwen3_5": dict(module="qwen3_5.modeling_qwen3_5", layer="Qwen3_5GatedDeltaNet",
                    attention="Qwen3_5Attention", model="Qwen3_5TextModel", vl="Qwen3_5Model"),
    "qwen3_5_moe": dict(module="qwen3_5_moe.modeling_qwen3_5_moe", layer="Qwen3_5MoeGatedDeltaNet",
                        attention="Qwen3_5MoeAttention", model="Qwen3_5MoeTextModel", vl="Qwen3_5MoeModel"),
    "olmo_hybrid": dict(module="olmo_hybrid.modeling_olmo_hybrid", layer="OlmoHybridGatedDeltaNet",
                        attention="OlmoHybridAttention", model="OlmoHybridModel", vl=None),
}

# sha256 of inspect.getsource(...) of the functions reproduced here, per release and family (see hf.py). From 5.17.0
# to 5.22.2 only the layers' forwards changed (how they read the cache: _has_state covers both).
_FP_SHARED = {  # the functions every family calls
    "causal_conv1d_fn": "f932149bdf42900c8cdd95cce7adaa6270a337906c3e018534e0e28c83d820fd",
    "torch_chunk_gated_delta_rule": "e4116a769851c6a455d1a277f0b5ad777090d73c9da491a84e4e9773e17c45d6",
    "apply_mask_to_padding_states": "ac70fe1177ec07fffda88e30269d307c4913464f169f12288b831d19a0437207",
}
_FP_QWEN_ATTENTION = "282e26183eb923131affae687e924eab5cda69c6128b4956a76ecc2230bec424"
_FP_517 = {
    "qwen3_next": dict(_FP_SHARED, **{
        "Qwen3NextGatedDeltaNet.forward": "fc80496fd00b799282c7fa25fe2bd60951ebb5546683d31463debdf7bef61165",
        "Qwen3NextAttention.forward": _FP_QWEN_ATTENTION,
        "Qwen3NextModel.forward": "dbee71d7b0bf2fb40a7c08d14adfc03541e225433b9e91f6244e7a834e7702a3",
        "Qwen3NextGatedDeltaNet.fix_query_key_value_ordering": "1b706d1f9a490a63c40fa7e35378758c7d66eb02762a5d60238b2f9942bc25a2",
    }),
    "qwen3_5": dict(_FP_SHARED, **{
        "Qwen3_5GatedDeltaNet.forward": "bd25761e1031fff0f6b24115dff8175ee9c8fb585287a4026b73a12bb0b5d816",
        "Qwen3_5Attention.forward": _FP_QWEN_ATTENTION,
        "Qwen3_5TextModel.forward": "8059c2ff169e914a0fe184fbb24a45129a5d75f91594165130532be9d337d8da",
    }),
    "qwen3_5_moe": dict(_FP_SHARED, **{
        "Qwen3_5MoeGatedDeltaNet.forward": "bd25761e1031fff0f6b24115dff8175ee9c8fb585287a4026b73a12bb0b5d816",
        "Qwen3_5MoeAttention.forward": _FP_QWEN_ATTENTION,
        "Qwen3_5MoeTextModel.forward": "27f0c97adcc3ea173a67d27f7113a9fe9e19b51600e4ba95dd966592242330d0",
    }),
    "olmo_hybrid": dict(_FP_SHARED, **{
        "OlmoHybridGatedDeltaNet.forward": "2cf524e0f1f4b6092737e879d697f269cfee4d4c8eb6155f387d3abfd7735d9f",
        "OlmoHybridAttention.forward": "09c9aa54eedd208eb4b6e95ef3a8572e340df88758b84166277dfc9de5d88723",
        "OlmoHybridModel.forward": "010d70611b265bfeddf64ee4748efee5f48a2cb2d5389b25fd726ed186dfa973",
    }),
}
# 5.22.2: the layers' forwards (family -> sha256 of its Gated DeltaNet layer's forward)
_FP_522_LAYERS = {
    "qwen3_next": "2850a3856efa1c94af53440e05e7cd1ed1ec3a12d87b39b39fc4220569c2c247",
    "qwen3_5": "43718d6c3e7255e63fc7a79d60c242912b48dbe00f351b9d80814ca0fb603037",
    "qwen3_5_moe": "43718d6c3e7255e63fc7a79d60c242912b48dbe00f351b9d80814ca0fb603037",
    "olmo_hybrid": "5e351648aa49864299c836517679600c4c1a4f629cf77bcca6321553963bb802",
}
_FINGERPRINTS = {
    "5.17.0": _FP_517,
    "5.22.2": {fam: dict(fps, **{f"{FAMILIES[fam]['layer']}.forward": _FP_522_LAYERS[fam]})
               for fam, fps in _FP_517.items()},
}
SUPPORTED_TRANSFORMERS = tuple(_FINGERPRINTS)
_SUPPORTED = ", ".join(SUPPORTED_TRANSFORMERS)

_LAYER_FORWARD_PARAMS = ["self", "hidden_states", "cache_params", "attention_mask", "kwargs"]
_ATTENTION_FORWARD_PARAMS = ["self", "hidden_states", "position_embeddings", "attention_mask", "past_key_values",
                             "kwargs"]
_MODEL_FORWARD_PARAMS = ["self", "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
                         "use_cache", "kwargs"]
_LAYER_ATTRS = {
    "qwen3_next": ("in_proj_qkvz", "in_proj_ba", "norm", "out_proj"),
    "qwen3_5": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "norm", "out_proj"),
    "olmo_hybrid": ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_norm", "o_proj",
                    "allow_neg_eigval"),
}
_LAYER_ATTRS["qwen3_5_moe"] = _LAYER_ATTRS["qwen3_5"]
_COMMON_LAYER_ATTRS = ("layer_idx", "num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "key_dim",
                       "value_dim", "conv_kernel_size", "conv1d", "activation", "A_log", "dt_bias")
_ATTENTION_ATTRS = ("head_dim", "num_key_value_groups", "scaling", "attention_dropout", "q_proj", "k_proj", "v_proj",
                    "o_proj", "q_norm", "k_norm")


def _fingerprint_objects(family: str, mod) -> dict:
    f = FAMILIES[family]
    layer, attn, model = getattr(mod, f["layer"]), getattr(mod, f["attention"]), getattr(mod, f["model"])
    objs = {
        f"{f['layer']}.forward": layer.forward,
        f"{f['attention']}.forward": attn.forward,
        f"{f['model']}.forward": model.forward,
        "causal_conv1d_fn": mod.causal_conv1d_fn,
        "torch_chunk_gated_delta_rule": mod.torch_chunk_gated_delta_rule,
        "apply_mask_to_padding_states": mod.apply_mask_to_padding_states,
    }
    if family == "qwen3_next":
        objs["Qwen3NextGatedDeltaNet.fix_query_key_value_ordering"] = layer.fix_query_key_value_ordering
    return objs


def _source_of(obj):
    while hasattr(obj, "__wrapped__"):  # the hub-kernel wrappers: the function itself
        obj = obj.__wrapped__
    return inspect.getsource(obj)


def _family_module(family: str, allow_untested_version: bool):
    """transformers' modeling module of ``family``, checked (version, classes, signatures, fingerprints)."""
    f = FAMILIES[family]
    return _hf._checked_module(
        f["module"], for_what=f" for {family}",
        untested=(f"the Gated DeltaNet integration ({family}) supports transformers {_SUPPORTED}, found "
                  "{version}: the layer code may differ. Install one of those, or pass allow_untested_version=True "
                  "to try anyway (the structural checks still run)"),
        names=(f["layer"], f["attention"], f["model"], "apply_mask_to_padding_states", "apply_rotary_pos_emb"),
        signatures=((f["layer"], _LAYER_FORWARD_PARAMS), (f["attention"], _ATTENTION_FORWARD_PARAMS),
                    (f["model"], _MODEL_FORWARD_PARAMS)),
        fingerprints={v: fp[family] for v, fp in _FINGERPRINTS.items()},
        objects=lambda mod: _fingerprint_objects(family, mod), allow_untested_version=allow_untested_version,
        source_of=_source_of)


def _mod(family: str):
    return importlib.import_module("transformers.models." + FAMILIES[family]["module"])


def _check_layer(m, family: str) -> None:
    for a in _COMMON_LAYER_ATTRS + _LAYER_ATTRS[family]:
        if not hasattr(m, a):
            raise RuntimeError(
                _err(f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has no attribute {a!r}; "
                     f"supported: transformers {_SUPPORTED}")
            )
    C, K = 2 * m.key_dim + m.value_dim, m.conv_kernel_size
    if tuple(m.conv1d.weight.shape) != (C, 1, K):
        raise RuntimeError(_err(f"layer {m.layer_idx}: conv1d.weight has shape {tuple(m.conv1d.weight.shape)}, "
                                f"expected ({C}, 1, {K}) (a depthwise convolution over q, k and v)"))
    if m.num_v_heads % m.num_k_heads:
        raise RuntimeError(_err(f"layer {m.layer_idx}: linear_num_value_heads ({m.num_v_heads}) must be a multiple "
                                f"of linear_num_key_heads ({m.num_k_heads})"))


def _check_attention(m) -> None:
    for a in _ATTENTION_ATTRS:
        if not hasattr(m, a):
            raise RuntimeError(
                _err(f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has no attribute {a!r}; "
                     f"supported: transformers {_SUPPORTED}")
            )


# ----------------------------------------------------------------------------------------------
# The convolution's halo under a group


def _halo_plan(lengths, rank: int, k1: int):
    """The halo messages of ``rank``: ``sends`` [(group rank, a, b)]: this piece's tokens [a, b) go to that
    rank; ``recvs`` [(group rank, c, d)]: that rank's tokens fill slots [c, d) of this rank's (K - 1)-token
    halo (slot K - 2 is the token just before the piece). Empty pieces need no halo and send none."""
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)

    def window(r):  # global tokens [lo, hi) that rank r's halo holds
        return (max(offs[r] - k1, 0), offs[r]) if lengths[r] > 0 else (0, 0)

    sends, recvs = [], []
    lo, hi = window(rank)
    for j in range(rank):
        a, b = max(lo, offs[j]), min(hi, offs[j + 1])
        if a < b:
            recvs.append((j, a - (offs[rank] - k1), b - (offs[rank] - k1)))
    for r in range(rank + 1, len(lengths)):
        lo, hi = window(r)
        a, b = max(lo, offs[rank]), min(hi, offs[rank + 1])
        if a < b:
            sends.append((r, a - offs[rank], b - offs[rank]))
    return sends, recvs


def _exchange(t, group, outgoing, incoming, out, accumulate: bool) -> None:
    """One round of point-to-point messages over ``group`` on (B, C, .) tensors: ``t[..., a:b]`` goes to group rank
    r for each (r, a, b) of ``outgoing``; what group rank r sends fills ``out[..., c:d]`` (``accumulate``: is
    added to it) for each (r, c, d) of ``incoming``."""
    import torch.distributed as dist

    B, C = t.shape[0], t.shape[1]
    reqs, keep, bufs = [], [], []
    for dst, a, b in outgoing:
        piece = t[..., a:b].contiguous()
        keep.append(piece)
        reqs.append(dist.isend(piece, dst=dist.get_global_rank(group, dst), group=group))
    for src, c, d in incoming:
        buf = t.new_empty(B, C, d - c)
        bufs.append((buf, c, d))
        reqs.append(dist.irecv(buf, src=dist.get_global_rank(group, src), group=group))
    for r in reqs:
        r.wait()
    for buf, c, d in bufs:
        if accumulate:
            out[..., c:d] += buf
        else:
            out[..., c:d] = buf


class _Halo(torch.autograd.Function):
    """x (B, C, n), this rank's pre-convolution features -> its (B, C, K - 1) halo (zeros where no token
    precedes the piece), by one round of point-to-point messages (_halo_plan). Backward: the halo's gradient
    goes back to the ranks that sent it, and the gradients of the tokens this rank sent come back to it."""

    @staticmethod
    def forward(ctx, x, group, sends, recvs, k1):
        B, C, _ = x.shape
        halo = x.new_zeros(B, C, k1)
        _exchange(x, group, sends, recvs, halo, accumulate=False)
        ctx.group, ctx.sends, ctx.recvs, ctx.shape, ctx.k1 = group, sends, recvs, x.shape, k1
        ctx.like = (x.dtype, x.device)
        return halo

    @staticmethod
    def backward(ctx, g):
        B, C, n = ctx.shape
        if g is None:
            g = torch.zeros(B, C, ctx.k1, dtype=ctx.like[0], device=ctx.like[1])
        grad_x = g.new_zeros(B, C, n)
        # the reverse round: halo slots go back to their senders, sent tokens' gradients come back (summed)
        _exchange(g, ctx.group, ctx.recvs, ctx.sends, grad_x, accumulate=True)
        return grad_x, None, None, None, None


def _halo(x, group, lengths, k1):
    """This rank's halo (B, C, K - 1) of x (B, C, n): see _Halo. None where no group / no kernel history."""
    if group is None or k1 == 0:
        return None
    rank, _ = _group_rank_size(group)
    sends, recvs = _halo_plan(lengths, rank, k1)
    if not sends and not recvs:
        return None
    # a rank that only sends gets zeros, through the node that brings the sent tokens' gradients back
    return _Halo.apply(x, group, sends, recvs, k1)


def _causal_conv(self, x, halo, ids, halo_ids):
    """transformers' causal_conv1d_fn (depthwise, kernel K, then the activation) of x (B, C, n), with the K - 1
    tokens before it in ``halo`` (None: zeros, the sequence's start) and, for packed documents, no tap reading
    a token of another document (``ids`` (B, n) / ``halo_ids`` (B, K - 1) document indices)."""
    act = _act(self.activation)
    weight, bias = self.conv1d.weight, self.conv1d.bias  # (C, 1, K)
    B, C, n = x.shape
    K = weight.shape[-1]
    xw = x.to(weight.dtype)
    if halo is None:
        halo = xw.new_zeros(B, C, K - 1)
    xe = torch.cat([halo.to(weight.dtype), xw], dim=-1)  # (B, C, K - 1 + n)
    if ids is None and n > 0:
        out = F.conv1d(xe, weight, bias, padding=0, groups=C)
    else:  # tap j reads token t - (K - 1 - j); empty pieces too (conv1d needs K inputs)
        ide = None if ids is None else torch.cat([halo_ids, ids], dim=1)  # (B, K - 1 + n)
        out = None
        for j in range(K):
            term = weight[:, 0, j, None] * xe[..., j:j + n]
            if ide is not None:
                term = term * (ide[:, j:j + n] == ids)[:, None, :].to(term.dtype)
            out = term if out is None else out + term
        if bias is not None:
            out = out + bias[:, None]
    return act(out).to(x.dtype)


def _act(name):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _has_state(cache, layer_idx: int) -> bool:
    """Whether the cache already holds this layer's state (a continuation: decode step or chunked prefill)."""
    if hasattr(cache, "get_recurrent_state"):  # transformers >= 5.18
        return (cache.get_recurrent_state(layer_idx, state_idx=0) is not None
                or cache.get_conv_state(layer_idx, state_idx=0) is not None)
    return bool(cache.has_previous_state(layer_idx))


# ----------------------------------------------------------------------------------------------
# The families' projections in and out


def _project_qwen3_next(self, hs):
    """Qwen3NextGatedDeltaNet: in_proj_qkvz / in_proj_ba and fix_query_key_value_ordering (explicit sizes, so
    that empty pieces reshape too). Returns mixed_qkv (B, n, C), z (B, n, Hv, Dv), beta, g (B, n, Hv)."""
    B, n, _ = hs.shape
    Hk, Hv, Dk, Dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
    r = Hv // Hk
    qkvz = self.in_proj_qkvz(hs).view(B, n, Hk, 2 * Dk + 2 * Dv * r)
    ba = self.in_proj_ba(hs).view(B, n, Hk, 2 * r)
    query, key, value, z = torch.split(qkvz, [Dk, Dk, r * Dv, r * Dv], dim=3)
    b, a = torch.split(ba, [r, r], dim=3)
    value = value.reshape(B, n, Hv, Dv)
    z = z.reshape(B, n, Hv, Dv)
    b = b.reshape(B, n, Hv)
    a = a.reshape(B, n, Hv)
    mixed_qkv = torch.cat((query.reshape(B, n, Hk * Dk), key.reshape(B, n, Hk * Dk), value.reshape(B, n, Hv * Dv)),
                          dim=-1)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
    return mixed_qkv, z, beta, g


def _project_qwen3_5(self, hs):
    B, n, _ = hs.shape
    mixed_qkv = self.in_proj_qkv(hs)
    z = self.in_proj_z(hs).reshape(B, n, self.num_v_heads, self.head_v_dim)
    b = self.in_proj_b(hs)
    a = self.in_proj_a(hs)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
    return mixed_qkv, z, beta, g


def _project_olmo_hybrid(self, hs):
    mixed_qkv = torch.cat([self.q_proj(hs), self.k_proj(hs), self.v_proj(hs)], dim=-1)
    beta = self.b_proj(hs).sigmoid()
    if self.allow_neg_eigval:
        beta = beta * 2.0
    g = -self.A_log.float().exp() * F.softplus(self.a_proj(hs).float() + self.dt_bias)
    return mixed_qkv, None, beta, g


def _finish_qwen(self, o, z, hs):
    B, n = o.shape[0], o.shape[1]
    out = self.norm(o.reshape(B * n * self.num_v_heads, self.head_v_dim),
                    z.reshape(B * n * self.num_v_heads, self.head_v_dim))
    return self.out_proj(out.reshape(B, n, self.value_dim))


def _finish_olmo_hybrid(self, o, z, hs):
    B, n = o.shape[0], o.shape[1]
    gate = self.g_proj(hs)
    out = self.o_norm(o.reshape(B * n * self.num_v_heads, self.head_v_dim),
                      gate.reshape(B * n * self.num_v_heads, self.head_v_dim))
    return self.o_proj(out.reshape(B, n, self.value_dim))


_PROJECT = {"qwen3_next": _project_qwen3_next, "qwen3_5": _project_qwen3_5, "qwen3_5_moe": _project_qwen3_5,
            "olmo_hybrid": _project_olmo_hybrid}
_FINISH = {"qwen3_next": _finish_qwen, "qwen3_5": _finish_qwen, "qwen3_5_moe": _finish_qwen,
           "olmo_hybrid": _finish_olmo_hybrid}


# ----------------------------------------------------------------------------------------------
# The patched forwards


def _no_cache_under_group():
    return RuntimeError(_err("past_key_values / cache_params (generation) is not supported under a sequence-parallel "
                             "group; generate with a model patched with sp_group=None"))


def _delta_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """The Gated DeltaNet layer's forward (transformers 5.17.0 / 5.22.2) with the delta rule on lasp."""
    family = self._lasp_family
    mod = _mod(family)
    group = self._lasp_sp.group
    if cache_params is not None:
        if group is not None:
            raise _no_cache_under_group()
        if _has_state(cache_params, self.layer_idx):  # a cached continuation: transformers' own code
            rest = {k: v for k, v in kwargs.items() if not k.startswith("lasp_")}
            return type(self).forward(self, hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                      **rest)

    hidden_states = mod.apply_mask_to_padding_states(hidden_states, attention_mask)
    B, n, _ = hidden_states.shape
    mixed_qkv, z, beta, g = _PROJECT[family](self, hidden_states)
    mixed_qkv = mixed_qkv.transpose(1, 2)  # (B, C, n)
    k1 = self.conv_kernel_size - 1

    # packed documents and, under a group, every rank's length
    if "lasp_documents" in kwargs:  # set by the model's pre-hook (under a group: agreed over it)
        docs = kwargs["lasp_documents"]
    else:
        packed, docs = _layer_documents(group, kwargs, B, n, hidden_states.device)
        if packed and cache_params is not None:
            raise ValueError(_err("cu_seq_lens_q (packed documents) cannot be used with a cache: a cache holds one "
                                  "state per row, a packed row holds several documents"))
    lengths, offset = None, 0
    if group is not None:
        lengths = kwargs.get("lasp_lengths")
        if lengths is None:
            lengths = _agree_call(group, n, _CALL_OK, hidden_states.device)
        rank, _ = _group_rank_size(group)
        offset = sum(lengths[:rank])

    if cache_params is not None:  # a prefill: transformers stores the convolution's input window
        mixed_qkv = cache_params.update_conv_state(mixed_qkv, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        mixed_qkv = mixed_qkv[:, :, mixed_qkv.shape[-1] - n:]

    halo = _halo(mixed_qkv, group, lengths, k1)
    ids = halo_ids = None
    starts = None
    if docs is not None:
        starts, ids, ids_all = docs
        halo_ids = torch.full((B, k1), -1, dtype=ids.dtype, device=ids.device)
        lo = max(offset - k1, 0)
        if offset > lo:
            halo_ids[:, k1 - (offset - lo):] = ids_all[:, lo:offset]
    mixed_qkv = _causal_conv(self, mixed_qkv, halo, ids, halo_ids)

    mixed_qkv = mixed_qkv.transpose(1, 2)
    query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(B, n, self.num_k_heads, self.head_k_dim)
    key = key.reshape(B, n, self.num_k_heads, self.head_k_dim)
    value = value.reshape(B, n, self.num_v_heads, self.head_v_dim)
    if starts is not None and bool(starts.any()):
        g = g.masked_fill(starts[..., None], float("-inf"))  # the state restarts at every document start

    out = gated_delta_attention(query, key, value, g, beta, group=group, layout="bnhd", use_qk_l2norm=True,
                                output_final_state=cache_params is not None, strategy=self._lasp_sp.strategy)
    if cache_params is not None:
        out, state = out
        cache_params.update_recurrent_state(state.to(torch.float32), self.layer_idx)  # as transformers keeps it
    return _FINISH[family](self, out, z, hidden_states)


def _sp_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """The hybrids' softmax attention (Qwen3NextAttention, Qwen3_5Attention, Qwen3_5MoeAttention,
    OlmoHybridAttention) under a sequence-parallel group: local queries, K and V all-gathered (hf._sp_sdpa)."""
    family = self._lasp_family
    mod = _mod(family)
    group = self._lasp_sp.group
    if past_key_values is not None:
        raise _no_cache_under_group()
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    gate = None
    if family == "olmo_hybrid":
        query_states = self.q_norm(self.q_proj(hidden_states)).view(hidden_shape).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states)).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    else:  # Qwen3-Next / Qwen3.5: an output gate from q_proj, per-head q / k norms
        query_states, gate = torch.chunk(
            self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2), 2, dim=-1
        )
        gate = gate.reshape(*input_shape, -1)
        query_states = self.q_norm(query_states.view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if position_embeddings is not None:  # OLMo hybrid without RoPE passes None (NoPE)
        cos, sin = position_embeddings  # from the global position ids
        query_states, key_states = mod.apply_rotary_pos_emb(query_states, key_states, cos, sin)

    attn_output = _sp_sdpa(self, group, query_states, key_states, value_states, kwargs,
                           lengths=kwargs.get("lasp_lengths"))
    attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1).contiguous()
    if gate is not None:
        attn_output = attn_output * torch.sigmoid(gate)
    return self.o_proj(attn_output), None


def _text_positions(pos, B):
    """(B, n) text position ids from what the caller passed: (B, n) / (1, n), or Qwen3.5's (4, B, n) (text row
    first) / (3, B, n) multimodal RoPE ids (row 0)."""
    if pos.dim() == 3:
        pos = pos[0]
    return pos.expand(B, -1)


def _model_pre_hook(module, args, kwargs):
    """Pre-forward hook of the decoder stack (Qwen3NextModel, Qwen3_5TextModel, Qwen3_5MoeTextModel,
    OlmoHybridModel); hf._model_pre_hook's rules, plus: the pieces' lengths for the layers under a group
    (``lasp_lengths``), and, without a group, packed documents from restarting position ids (the linear
    layers of these models are not handed the position ids; the full-attention layers get transformers' mask to
    see them: hf._keep_packed_apart)."""
    group = module._lasp_sp.group
    call, packed, ref = _hook_call(module, args, kwargs)
    if ref is None:
        if group is None and not packed:
            return None  # transformers raises its own error
        raise ValueError(_err("input_ids or inputs_embeds is required"))
    B, n = ref.shape[0], ref.shape[1]
    pos = call.get("position_ids")

    if group is None and not packed:
        if pos is None or n < 2 or not isinstance(pos, torch.Tensor):
            return None
        starts = _doc_starts(_text_positions(pos, B), B)
        if not bool(starts.any()):
            return None
        ids = starts.to(torch.int64).cumsum(1)
        call["lasp_documents"] = (starts, ids, ids)
        if module._lasp_has_full_attention:
            _hf._keep_packed_apart(call, starts)
        return (), call

    lengths = _settle_call(module, group, call, packed, B, n, ref.device, "pass use_cache=False")
    if group is not None:
        empty = [r for r, m in enumerate(lengths) if m == 0]
        if empty:  # the same on every rank: all raise alike
            raise ValueError(_err(f"input_ids / inputs_embeds: the pieces of group ranks {empty} are empty; "
                                  "transformers' mask creation needs at least one token per rank (the layers "
                                  "themselves take empty pieces)"))
        call["lasp_lengths"] = lengths
    return _call_documents(group, call, packed, None if pos is None else _text_positions(pos, B), B, n, lengths,
                           ref.device)


# ----------------------------------------------------------------------------------------------
# Public API


def _family_of(model):
    return _hf._families_in(model, FAMILIES, "layer")


def patch_gated_deltanet(model: torch.nn.Module, sp_group=None, *, sp_strategy: str = "ring",
                         allow_untested_version: bool = False) -> torch.nn.Module:
    """Run the Gated DeltaNet layers of a transformers Qwen3-Next, Qwen3.5 / Qwen3.5-MoE or OLMo hybrid model
    through lasp (in place; returns the model). See the module docstring.

    Args:
        model: the model (``Qwen3NextForCausalLM``, ``Qwen3_5ForCausalLM``, ``OlmoHybridForCausalLM``, their base
            models, ... or any module holding the family's Gated DeltaNet layers).
        sp_group: None, or a torch.distributed ProcessGroup over which each sequence is split (group rank r passes
            the r-th contiguous piece). The full-attention layers then all-gather K and V; position ids default to
            the global positions; no cache, no padding masks with full-attention layers. Qwen3.5's
            vision-language model (``Qwen3_5Model``, ``Qwen3_5ForConditionalGeneration``) is not supported under
            a group (its multimodal position ids are made per piece): patch its text model.
        sp_strategy: how the delta-rule layers pass their states across sp_group: "ring" (default),
            "allgather", "scan" or "auto" (gated_delta_attention's strategy).
        allow_untested_version: run on a transformers not in SUPPORTED_TRANSFORMERS (at your own risk).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(_err(f"patch_gated_deltanet: model must be a torch.nn.Module, got {type(model).__name__}"))
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise RuntimeError(_err("model is already patched; call unpatch(model) first"))
    _check_strategy(sp_strategy)
    families = _family_of(model)
    if not families:
        raise ValueError(_err("patch_gated_deltanet: no Gated DeltaNet layer ("
                              + ", ".join(f["layer"] for f in FAMILIES.values()) + f") found in {type(model).__name__}"))
    if len(families) > 1:
        raise ValueError(_err(f"patch_gated_deltanet: {type(model).__name__} mixes the layers of {families}"))
    family = families[0]
    f = FAMILIES[family]
    mod = _family_module(family, allow_untested_version)
    if sp_group is not None:
        _group_rank_size(sp_group)
        if f["vl"] is not None and any(isinstance(m, getattr(mod, f["vl"])) for m in model.modules()):
            raise NotImplementedError(
                _err(f"sp_group: {f['vl']} (the vision-language model) is not supported under a sequence-parallel "
                     "group, its multimodal position ids are computed per piece; patch its text model "
                     f"({f['model']}, e.g. model.model.language_model) or use the causal LM")
            )

    layers = [m for m in model.modules() if isinstance(m, getattr(mod, f["layer"]))]
    all_full = [m for m in model.modules() if isinstance(m, getattr(mod, f["attention"]))]
    full = all_full if sp_group is not None else []
    bases = [m for m in model.modules() if isinstance(m, getattr(mod, f["model"]))]
    if sp_group is not None and not bases:
        raise ValueError(_err(f"sp_group: {type(model).__name__} holds no {f['model']}, whose pre-forward hook "
                              "agrees the call over the group; patch the model (not the bare layers)"))
    for m in layers:
        _check_layer(m, family)
    for m in full:
        _check_attention(m)

    patched = []
    holder = _SpGroup(sp_group, strategy=sp_strategy)
    for m, fwd in [(m, _delta_forward) for m in layers] + [(m, _sp_attention_forward) for m in full]:
        m._lasp_sp = holder
        m._lasp_family = family
        m.forward = functools.partial(fwd, m)  # see hf.patch_minimax (deepcopy / pickling)
        patched.append(m)
    handles = []
    for b in bases:
        b._lasp_sp = holder
        b._lasp_has_full_attention = bool(all_full)
        handles.append(b.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        patched.append(b)
    setattr(model, _PATCH_ATTR, {"modules": patched, "handles": handles, "sp_group": holder, "family": family})
    return model


def unpatch_gated_deltanet(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_gated_deltanet (the same as ``lasp.integrations.hf.unpatch``; returns the model)."""
    return _hf.unpatch(model)
