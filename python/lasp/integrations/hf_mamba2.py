"""Mamba-2 SSD models of HuggingFace transformers on lasp: Mamba2, Bamba, NemotronH, GraniteMoeHybrid, Zamba2,
FalconH1.

``patch_mamba2(model, sp_group=None)`` (also reached through ``lasp.integrations.hf.patch``) swaps, in every Mamba-2
mixer of the model, only the SSD scan for ``lasp.lasp_attention``, in place; ``lasp.integrations.hf.unpatch``
restores transformers' own code. The mixer's forward is transformers' own code (its projections, the short
causal convolution, dt / A / D, the gated RMSNorm and the output projection, its cache handling and its
one-token decode step), run with three of the functions it calls replaced:

* ``mamba2_chunk_scan`` (the SSD scan) by lasp: ``dt = softplus(dt + dt_bias)`` clamped to the mixer's
  ``time_step_limit`` as transformers does, then the state ``S[t] = exp(dt[t] A) S[t-1] + B[t]^T (dt[t] x[t])``,
  ``y[t] = C[t] S[t] + D x[t]`` is ``lasp_attention(q=C, k=B, v=dt x, g=dt A, scale=1, layout="bnhd")``: B and C
  keep their ``n_groups`` heads (lasp maps output head ``h`` to group ``h // (H / n_groups)``, transformers'
  ``repeat_interleave``, without the copies), the cache's ``(B, H, head_dim, state)`` state is lasp's
  ``(B, H, state, head_dim)`` transposed. lasp computes in float64 for float64 models and in float32
  otherwise (transformers' torch path: float32 always);
* ``mamba2_split_conv1d_scan_combined`` (the fused training path of mamba_ssm) by nothing, so that the
  mixer takes its unfused path through the two others;
* ``causal_conv1d_fn`` by transformers' own, except under a group or with packed documents, where the
  convolution of a piece's first ``K - 1`` tokens reads the tokens before the piece (the halo exchange of
  the Gated DeltaNet integration) and no tap reads another document.

Sequence parallelism (``sp_group``; every family): group rank ``r`` feeds the model the ``r``-th contiguous piece
of every sequence; the scan passes its state along the group (lasp's ring, or ``sp_strategy``), the convolution's
halo comes from the earlier ranks, and the hybrids' attention layers (BambaAttention, NemotronHAttention,
GraniteMoeHybridAttention, Zamba2Attention, FalconH1Attention) attend to K and V all-gathered along the sequence
(as MiniMax's, hf._sp_sdpa), causal over the global positions, with RoPE (where the model has it) from the global
position ids. Each of those forwards is transformers' own up to the attention itself: the projections (Zamba2: the
shared block's plus the hybrid layer's own adapters; FalconH1: the key multiplier), the model's softmax scale
(GraniteMoeHybrid: attention_multiplier; Zamba2: (head_dim / 2)^-0.5). No cache, no padding mask beyond ones.

Packed documents: position ids that restart (``DataCollatorWithFlattening``) or ``cu_seq_lens_q`` (global offsets
under a group), on every family: the state and the convolution restart at every document start (transformers' own
Mamba-2 path does neither), and the hybrids' attention keeps the documents apart. On one device that is
transformers' own attention, whose causal mask cuts at documents only without a cache and without an attention
mask: a packed call drops an all-ones mask and turns the cache off, and refuses a cache asked for or a padding mask
with a document start between unpadded tokens (_packed_attention); GraniteMoeHybridModel, which builds its mask
without the position ids, gets it built with them. Under a group the swapped attention masks across documents.

Versions: read from transformers 5.17.0 and checked against 5.22.2; per release, sha256 fingerprints of the
mixer's forward and of the three functions it calls, and for the hybrids of the attention forward reproduced under
a group, the apply_rotary_pos_emb it calls and the base model's forward (see hf.py); ``allow_untested_version=True``
skips the version and fingerprint checks, not the structural ones.
"""
from __future__ import annotations

import contextvars
import functools
import importlib
import types

import torch
import torch.nn.functional as F

from .. import lasp_attention
from . import hf as _hf
from .hf import _PATCH_ATTR, _SpGroup, _check_strategy, _err, _group_rank_size

__all__ = ["patch_mamba2", "unpatch_mamba2", "FAMILIES", "SUPPORTED_TRANSFORMERS"]

# family -> transformers module, the Mamba-2 mixer class, the base model (the pre-forward hook's), whether the
# family interleaves attention layers, the attention class (swapped under a group: _SP_ATTENTION), whether that
# attention applies RoPE through the module's apply_rotary_pos_emb, and whether the base model builds its causal
# mask from the position ids (transformers' packed-sequence detection; GraniteMoeHybrid's does not)
FAMILIES = {
    "mamba2": dict(module="mamba2.modeling_mamba2", mixer="Mamba2Mixer", model="Mamba2Model", hybrid=False),
    "bamba": dict(module="bamba.modeling_bamba", mixer="BambaMixer", model="BambaModel", hybrid=True,
                  attention="BambaAttention", rope=True, mask_reads_positions=True),
    "nemotron_h": dict(module="nemotron_h.modeling_nemotron_h", mixer="NemotronHMamba2Mixer", model="NemotronHModel",
                       hybrid=True, attention="NemotronHAttention", rope=False, mask_reads_positions=True),
    "granitemoehybrid": dict(module="granitemoehybrid.modeling_granitemoehybrid", mixer="GraniteMoeHybridMambaLayer",
                             model="GraniteMoeHybridModel", hybrid=True, attention="GraniteMoeHybridAttention",
                             rope=True, mask_reads_positions=False),
    "zamba2": dict(module="zamba2.modeling_zamba2", mixer="Zamba2MambaMixer", model="Zamba2Model", hybrid=True,
                   attention="Zamba2Attention", rope=True, mask_reads_positions=True),
    "falcon_h1": dict(module="falcon_h1.modeling_falcon_h1", mixer="FalconH1Mixer", model="FalconH1Model",
                      hybrid=True, attention="FalconH1Attention", rope=True, mask_reads_positions=True),
}
_SWAPPED = ("mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined", "causal_conv1d_fn")

# sha256 of the source of each family's mixer forward and of the functions it calls that are replaced, per release
# (5.22.2 rewrote mamba2_chunk_scan's sums as einsums, the same function, and the mixers' cache reads); for the
# hybrids also of the attention forward reproduced under a group, the apply_rotary_pos_emb it calls and the base
# model's forward (the position ids, masks and keyword arguments the layers get)
_FP_MIXER = {"5.17.0": "4c1413f8c1a70c668e17ca261737361040ea456bf32548319781f41111d497b6",
             "5.22.2": "691f3ca98636d47322a3febd3c3036a9f928f257a66fdc1008a81274f1f696ff"}
_FP_FALCON_MIXER = {"5.17.0": "5fe2152b3bb12d04e993cd51cf82215154a71e3184bd341fae5af6d700e4a214",
                    "5.22.2": "8274bd4cb6961bb4c45f23e0dab0cd6579861e8258a4d4e768a17a060778a4ab"}
_FP_SCAN = {"5.17.0": "108ef04b5d5a71bbaa97d43dfa97761edb93e0ae5e4ba2a54ee081ab2364066c",
            "5.22.2": "8f4198702b90b969b62c6825a8ac5c9267e55b697dc6bf09c5e07e34641fd3ca"}
_FP_SAME = {  # the same source in both releases
    "mamba2_split_conv1d_scan_combined": "032602e1a9a897400e70460ddb05a2627127920ef084b85f5f4833001973070d",
    "causal_conv1d_fn": "f932149bdf42900c8cdd95cce7adaa6270a337906c3e018534e0e28c83d820fd",
}
_FP_ROPE = "ea234325c15de475147027ac7da4307167d082b13f4c62a7f2921fef4f9e5e87"  # Granite's, Zamba2's, FalconH1's
_FP_HYBRID = {  # family -> the attention forward, apply_rotary_pos_emb and the model forward (same in both releases
    # but NemotronHModel.forward, whose 5.22.2 version returns MoeModelOutputWithPast: _FP_522_MODEL)
    "bamba": {"BambaAttention.forward": "dc6807936ef6103d2675e82361b9c82359d43356a331140bbb1a974595522bff",
              "apply_rotary_pos_emb": "ab8feb64f19555713efc4c559ce306b35205b1197f8431784585999d9a5b6662",
              "BambaModel.forward": "0eec85a8eadea870d251259ac329da6e62fcc14decf02c98506d309024606eed"},
    "nemotron_h": {"NemotronHAttention.forward": "58671837f18bee9fb383d2eb408e31b3448e686e72cf035e4a096a104e978ac4",
                   "NemotronHModel.forward": "b2b9b9ab843405094aceaf0ff5b8f3096f23bec4bca2b96f5b645713b4455e74"},
    "granitemoehybrid": {
        "GraniteMoeHybridAttention.forward": "3e74d13f729b0fe695ab04b83c6229069086ede297493e17f9a636c2aef86aa9",
        "apply_rotary_pos_emb": _FP_ROPE,
        "GraniteMoeHybridModel.forward": "23e22e7682082ba9910e46e324709310872f81b80ff354890e2ec8a3abeb4801"},
    "zamba2": {"Zamba2Attention.forward": "b8fd16508166d522146f098be1fcb93bce0bd63472b2942dbb6acd0f1e051531",
               "apply_rotary_pos_emb": _FP_ROPE,
               "Zamba2Model.forward": "7ca1f7830d97976dd78c5f4c0dc7d7c483ec4c658edd7253119162c593d3e6d8"},
    "falcon_h1": {"FalconH1Attention.forward": "8c50842e278880942965c9d123259c187b3867503696c4fd07b4cce5515d7c15",
                  "apply_rotary_pos_emb": _FP_ROPE,
                  "FalconH1Model.forward": "faac1240e77dab5dbb447868a8c5eb736754f675b00cd16912fd6bc1af1f3e12"},
}
_FP_522_MODEL = {"NemotronHModel.forward": "86af5330d3f28bc6c11675aca4b00b130c20a7fdaa8390fc4f00588ed7d359c9"}


def _fingerprints(version: str) -> dict:
    out = {}
    for fam, f in FAMILIES.items():
        mixer = (_FP_FALCON_MIXER if fam == "falcon_h1" else _FP_MIXER)[version]
        fp = {f"{f['mixer']}.forward": mixer, "mamba2_chunk_scan": _FP_SCAN[version], **_FP_SAME}
        for key, h in _FP_HYBRID.get(fam, {}).items():
            fp[key] = _FP_522_MODEL.get(key, h) if version == "5.22.2" else h
        out[fam] = fp
    return out


_FINGERPRINTS = {v: _fingerprints(v) for v in ("5.17.0", "5.22.2")}
SUPPORTED_TRANSFORMERS = tuple(_FINGERPRINTS)
_SUPPORTED = ", ".join(SUPPORTED_TRANSFORMERS)

_LAYER = contextvars.ContextVar("lasp_mamba2_layer", default=None)


def _mod(family: str):
    return importlib.import_module("transformers.models." + FAMILIES[family]["module"])


def _source_of(obj):
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    import inspect

    return inspect.getsource(obj)


def _fingerprint_objects(family: str, mod) -> dict:
    f = FAMILIES[family]
    objs = {f"{f['mixer']}.forward": getattr(mod, f["mixer"]).forward}
    for name in _SWAPPED:
        objs[name] = getattr(mod, name)
    if "attention" in f:  # reproduced under a group (_SP_ATTENTION)
        objs[f"{f['attention']}.forward"] = getattr(mod, f["attention"]).forward
        if f["rope"]:
            objs["apply_rotary_pos_emb"] = mod.apply_rotary_pos_emb
        # the position ids, the masks and the keyword arguments the layers get (packed documents, SP)
        objs[f"{f['model']}.forward"] = getattr(mod, f["model"]).forward
    return objs


def _family_module(family: str, allow_untested_version: bool):
    f = FAMILIES[family]
    return _hf._checked_module(
        f["module"], for_what=f" for {family}",
        untested=(f"the Mamba-2 integration ({family}) supports transformers {_SUPPORTED}, found {{version}}: the "
                  "mixer code may differ. Install one of those, or pass allow_untested_version=True to try anyway "
                  "(the structural checks still run)"),
        names=(f["mixer"], f["model"]) + _SWAPPED,
        signatures=(),
        fingerprints={v: fp.get(family, {}) for v, fp in _FINGERPRINTS.items()},
        objects=lambda mod: _fingerprint_objects(family, mod), allow_untested_version=allow_untested_version,
        source_of=_source_of)


# ----------------------------------------------------------------------------------------------
# The replaced functions (the mixer in _LAYER)


def _no_fused(*args, **kwargs):
    """mamba2_split_conv1d_scan_combined: none, so that the mixer runs its unfused path (conv, then the scan)."""
    return None


def _scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None, dt_softplus=False,
          dt_limit=(0.0, float("inf")), return_final_states=False, z=None, **kwargs):
    """mamba2_chunk_scan on lasp_attention (see the module docstring)."""
    if z is not None:
        raise NotImplementedError(_err("mamba2_chunk_scan with z (a gate inside the scan) is not supported"))
    layer = _LAYER.get()
    group = None if layer is None else layer._lasp_sp.group
    strategy = "ring" if layer is None else layer._lasp_sp.strategy
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    x = hidden_states.to(acc)
    dtf = dt.to(acc)
    g = dtf * A.to(acc)  # (B, n, H): log decay <= 0
    docs = kwargs.get("lasp_documents")
    if docs is not None:
        starts = docs[0]
        if bool(starts.any()):
            g = g.masked_fill(starts[..., None], float("-inf"))  # the state restarts at every document start
    init = None if initial_states is None else initial_states.transpose(-1, -2).to(acc)
    o, fin = lasp_attention(C.to(acc), B.to(acc), x * dtf[..., None], g=g, scale=1.0, layout="bnhd",
                            initial_state=init, output_final_state=True, group=group, strategy=strategy)
    if D is not None:
        o = o + D.to(acc)[:, None] * x
    o = o.contiguous()  # as transformers' (its callers view it)
    return (o, fin.transpose(-1, -2).contiguous()) if return_final_states else o


def _conv(hidden_states, weight, bias=None, activation=None, **kwargs):
    """causal_conv1d_fn: transformers' own, or (under a group / with packed documents) with the halo from the earlier
    ranks and no tap across a document start (hf_delta._causal_conv)."""
    from .hf_delta import _causal_conv, _halo

    layer = _LAYER.get()
    group = layer._lasp_sp.group
    docs = kwargs.get("lasp_documents")
    if group is None and docs is None:  # transformers' own
        return _mod(layer._lasp_family).causal_conv1d_fn(hidden_states, weight, bias, activation=activation)
    B, _, n = hidden_states.shape
    k1 = weight.shape[-1] - 1
    lengths, offset = kwargs.get("lasp_lengths"), 0
    if group is not None:
        rank, _ = _group_rank_size(group)
        offset = sum(lengths[:rank])
    halo = _halo(hidden_states, group, lengths, k1)
    ids = halo_ids = None
    if docs is not None:
        _, ids, ids_all = docs
        halo_ids = torch.full((B, k1), -1, dtype=ids.dtype, device=ids.device)
        lo = max(offset - k1, 0)
        if offset > lo:
            halo_ids[:, k1 - (offset - lo):] = ids_all[:, lo:offset]
    return _causal_conv(layer, hidden_states, halo, ids, halo_ids)


@functools.lru_cache(maxsize=None)
def _swapped_forward(cls):
    """cls.forward (transformers' mixer forward) running with _SWAPPED replaced: the same code object with other
    globals (re-decorated with transformers' accelerate-hook decorator where it had one)."""
    fwd = cls.forward
    inner = getattr(fwd, "__wrapped__", fwd)
    glb = dict(inner.__globals__, mamba2_chunk_scan=_scan, mamba2_split_conv1d_scan_combined=_no_fused,
               causal_conv1d_fn=_conv)
    new = types.FunctionType(inner.__code__, glb, inner.__name__, inner.__defaults__, inner.__closure__)
    new.__kwdefaults__ = inner.__kwdefaults__
    if inner is not fwd:
        from transformers.integrations.accelerate import force_accelerate_hooks

        new = force_accelerate_hooks("conv1d")(new)
    return new


def _mixer_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """The mixer's forward with the SSD scan on lasp (see the module docstring)."""
    if self._lasp_sp.group is not None and cache_params is not None:
        raise RuntimeError(_err("cache_params (generation) is not supported under a sequence-parallel group; "
                                "generate with a model patched with sp_group=None"))
    token = _LAYER.set(self)
    try:
        return _swapped_forward(type(self))(self, hidden_states, cache_params=cache_params,
                                            attention_mask=attention_mask, **kwargs)
    finally:
        _LAYER.reset(token)


_PACKING_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _lm_pre_hook(module, args, kwargs):
    """Pre-forward hook of the causal LM around a Mamba2Model (Mamba2ForCausalLM), which does not pass its extra
    keyword arguments on to the model: the packing ones (position ids, cu_seq_lens_q / _k) are handed to the
    model's own hook."""
    pending = {k: kwargs[k] for k in _PACKING_KWARGS if kwargs.get(k) is not None}
    if pending:
        module.backbone._lasp_pending = pending
    return None


def _no_cache_under_group(past_key_values):
    if past_key_values is not None:
        raise RuntimeError(_err("past_key_values (generation) is not supported under a sequence-parallel group; "
                                "generate with a model patched with sp_group=None"))


def _qkv(self, hidden_states):
    """The q / k / v projections of a Llama-style attention, (B, heads, n, head_dim) each."""
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    return tuple(proj(hidden_states).view(hidden_shape).transpose(1, 2)
                 for proj in (self.q_proj, self.k_proj, self.v_proj))


def _sp_attend(self, hidden_states, query_states, key_states, value_states, kwargs):
    """The local queries over K and V all-gathered along the sequence (hf._sp_sdpa: causal over global positions,
    documents apart), then o_proj; returns the attention forward's (output, None)."""
    out = _hf._sp_sdpa(self, self._lasp_sp.group, query_states, key_states, value_states, kwargs,
                       lengths=kwargs.get("lasp_lengths"))
    out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(out), None


def _sp_bamba(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
    """BambaAttention.forward under a group (Llama-style: q / k / v projections, RoPE from the global position ids)."""
    _no_cache_under_group(past_key_values)
    query_states, key_states, value_states = _qkv(self, hidden_states)
    cos, sin = position_embeddings
    query_states, key_states = _mod(self._lasp_family).apply_rotary_pos_emb(query_states, key_states, cos, sin)
    return _sp_attend(self, hidden_states, query_states, key_states, value_states, kwargs)


def _sp_nemotron_h(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
    """NemotronHAttention.forward under a group (no positional encoding)."""
    _no_cache_under_group(past_key_values)
    query_states, key_states, value_states = _qkv(self, hidden_states)
    return _sp_attend(self, hidden_states, query_states, key_states, value_states, kwargs)


def _sp_granitemoehybrid(self, hidden_states, attention_mask, past_key_values=None, position_embeddings=None,
                         **kwargs):
    """GraniteMoeHybridAttention.forward under a group (RoPE from the global position ids where the model has it;
    its scaling is config.attention_multiplier, self.scaling)."""
    _no_cache_under_group(past_key_values)
    query_states, key_states, value_states = _qkv(self, hidden_states)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        query_states, key_states = _mod(self._lasp_family).apply_rotary_pos_emb(query_states, key_states, cos, sin)
    return _sp_attend(self, hidden_states, query_states, key_states, value_states, kwargs)


def _sp_zamba2(self, hidden_states, layer_idx, attention_mask=None, past_key_values=None, position_embeddings=None,
               **kwargs):
    """Zamba2Attention.forward under a group: the shared block's q / k / v projections plus the adapters of the hybrid
    layer ``layer_idx`` (use_shared_attention_adapter), RoPE from the global position ids (use_mem_rope)."""
    _no_cache_under_group(past_key_values)
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query_states = self.q_proj(hidden_states)
    key_states = self.k_proj(hidden_states)
    value_states = self.v_proj(hidden_states)
    if self.config.use_shared_attention_adapter:
        adapter_layer_idx = self.layer_dic[layer_idx]
        query_states = query_states + self.linear_q_adapter_list[adapter_layer_idx](hidden_states)
        key_states = key_states + self.linear_k_adapter_list[adapter_layer_idx](hidden_states)
        value_states = value_states + self.linear_v_adapter_list[adapter_layer_idx](hidden_states)
    query_states = query_states.view(hidden_shape).transpose(1, 2)
    key_states = key_states.view(hidden_shape).transpose(1, 2)
    value_states = value_states.view(hidden_shape).transpose(1, 2)
    if self.config.use_mem_rope:
        cos, sin = position_embeddings
        query_states, key_states = _mod(self._lasp_family).apply_rotary_pos_emb(query_states, key_states, cos, sin)
    return _sp_attend(self, hidden_states, query_states, key_states, value_states, kwargs)


def _sp_falcon_h1(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """FalconH1Attention.forward under a group (keys times key_multiplier, RoPE from the global position ids)."""
    _no_cache_under_group(past_key_values)
    query_states, key_states, value_states = _qkv(self, hidden_states)
    key_states = key_states * self.key_multiplier
    cos, sin = position_embeddings
    query_states, key_states = _mod(self._lasp_family).apply_rotary_pos_emb(query_states, key_states, cos, sin)
    return _sp_attend(self, hidden_states, query_states, key_states, value_states, kwargs)


# family -> its attention forward under a group: transformers' own (fingerprinted) up to the attention itself,
# which attends to K and V all-gathered along the sequence
_SP_ATTENTION = {"bamba": _sp_bamba, "nemotron_h": _sp_nemotron_h, "granitemoehybrid": _sp_granitemoehybrid,
                 "zamba2": _sp_zamba2, "falcon_h1": _sp_falcon_h1}
_ATTENTION_ATTRS = ("head_dim", "num_key_value_groups", "scaling", "attention_dropout", "q_proj", "k_proj", "v_proj",
                    "o_proj")
_ATTENTION_EXTRA_ATTRS = {"zamba2": ("config", "layer_dic"), "falcon_h1": ("key_multiplier",)}


def _model_pre_hook(module, args, kwargs):
    """Pre-forward hook of the Mamba-2 base models: hf_delta's rules (the pieces' lengths and documents agreed over
    the group and handed to the layers, a cache (Mamba-2's cache_params too) refused on every rank alike; packed calls
    without a group), with the packing arguments the causal LM did not pass on; then, for the hybrids on one device,
    what their attention layers need to keep packed documents apart (_packed_attention)."""
    from .hf_delta import _model_pre_hook as delta_hook

    pending = module.__dict__.pop("_lasp_pending", None)
    if pending:
        kwargs = dict(pending, **kwargs)
    out = delta_hook(module, args, kwargs)
    if out is None or module._lasp_sp.group is not None or not module._lasp_has_full_attention:
        return out
    _, call = out
    if call.get("lasp_documents") is None:
        return out
    return (), _packed_attention(module, call)


def _packed_attention(module, call):
    """A hybrid's packed call on one device (documents found by the hook): make transformers' own attention layers
    keep the documents apart, or refuse the call. transformers' causal mask cuts at documents (its packed-sequence
    detection from the position ids) only without a cache and without an attention mask, so:

    * documents from restarting position ids (no cu_seq_lens_q): hf._keep_packed_apart (applied by hf_delta's hook,
      which this one runs first: the mask and the cache);
    * cu_seq_lens_q: the hook's rules have already refused caches and masks and made the position ids;
    * GraniteMoeHybridModel, which builds its causal mask without the position ids, gets the masks built here with
      them, through transformers' create_causal_mask (eager / sdpa / flex attention; its flash attention gets
      cu_seq_lens_q / cu_seq_lens_k where the caller passed them, and packed position ids alone are refused)."""
    family = module._lasp_family
    packed = call.get("cu_seq_lens_q") is not None or call.get("cu_seq_lens_k") is not None
    if not packed and call.get("attention_mask") is not None:
        return call  # after hf._keep_packed_apart (hf_delta's hook): the caller's own mask, as given
    if not FAMILIES[family]["mask_reads_positions"]:
        call["attention_mask"] = _packed_masks(module, call, packed)
    return call


def _packed_masks(module, call, packed: bool):
    """{"full_attention": ..., "linear_attention": ...}: the masks of a packed call (no cache, no padding) built by
    transformers' own create_causal_mask / create_recurrent_attention_mask with the position ids, for a base model
    whose forward builds them without (it takes a dict as given)."""
    mod = _mod(module._lasp_family)
    config = module.config
    impl = config._attn_implementation
    if not packed and impl not in ("eager", "sdpa", "flex_attention"):
        raise NotImplementedError(_err(
            f"position_ids restart (packed documents): {type(module).__name__} with attn_implementation={impl!r} "
            "does not pass the position ids to its attention; pass cu_seq_lens_q / cu_seq_lens_k (and max_length_q "
            "/ max_length_k) for packed rows, or use attn_implementation 'sdpa' or 'eager'"))
    ref = call.get("inputs_embeds")
    if ref is None:
        ref = call["input_ids"]
        dtype = module.get_input_embeddings().weight.dtype
    else:
        dtype = ref.dtype
    like = torch.empty(ref.shape[0], ref.shape[1], 0, dtype=dtype, device=ref.device)  # shape, dtype, device only
    kw = dict(config=config, inputs_embeds=like, attention_mask=None, past_key_values=None,
              position_ids=call["position_ids"])
    return {"full_attention": mod.create_causal_mask(**kw), "linear_attention": mod.create_recurrent_attention_mask(**kw)}


# ----------------------------------------------------------------------------------------------
# Public API


def _family_of(model):
    return _hf._families_in(model, FAMILIES, "mixer")


def _check_mixer(m, family: str) -> None:
    for a in ("conv1d", "activation", "layer_idx"):
        if not hasattr(m, a):
            raise RuntimeError(_err(f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has no attribute "
                                    f"{a!r}; supported: transformers {_SUPPORTED}"))


def _check_attention(m, family: str) -> None:
    for a in _ATTENTION_ATTRS + _ATTENTION_EXTRA_ATTRS.get(family, ()):
        if not hasattr(m, a):
            raise RuntimeError(_err(f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has no attribute "
                                    f"{a!r}; supported: transformers {_SUPPORTED}"))


def patch_mamba2(model: torch.nn.Module, sp_group=None, *, sp_strategy: str = "ring",
                 allow_untested_version: bool = False) -> torch.nn.Module:
    """Run the SSD scan of the Mamba-2 mixers of a transformers model through lasp (in place; returns the model).
    See the module docstring.

    Args:
        model: a Mamba2, Bamba, NemotronH, GraniteMoeHybrid, Zamba2 or FalconH1 model (its causal LM, its base model,
            or any module holding the family's mixers).
        sp_group: None, or a torch.distributed ProcessGroup over which each sequence is split (group rank r passes
            the r-th contiguous piece; the hybrids' attention layers then attend to K and V all-gathered along the
            sequence). No cache, no padding mask beyond ones under a group.
        sp_strategy: how the scan passes its state across sp_group ("ring", "allgather", "scan", "auto").
        allow_untested_version: run on a transformers not in SUPPORTED_TRANSFORMERS (at your own risk).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(_err(f"patch_mamba2: model must be a torch.nn.Module, got {type(model).__name__}"))
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise RuntimeError(_err("model is already patched; call unpatch(model) first"))
    _check_strategy(sp_strategy)
    families = _family_of(model)
    if not families:
        raise ValueError(_err("patch_mamba2: no Mamba-2 mixer (" + ", ".join(f["mixer"] for f in FAMILIES.values())
                              + f") found in {type(model).__name__}"))
    if len(families) > 1:
        raise ValueError(_err(f"patch_mamba2: {type(model).__name__} mixes the mixers of {families}"))
    family = families[0]
    f = FAMILIES[family]
    mod = _family_module(family, allow_untested_version)
    bases = [m for m in model.modules() if isinstance(m, getattr(mod, f["model"]))]
    if sp_group is not None:
        _group_rank_size(sp_group)
        if not bases:
            raise ValueError(_err(f"sp_group: {type(model).__name__} holds no {f['model']}, whose pre-forward hook "
                                  "agrees the call over the group; patch the model (not the bare mixers)"))
    mixers = [m for m in model.modules() if isinstance(m, getattr(mod, f["mixer"]))]
    for m in mixers:
        _check_mixer(m, family)
    attention = [m for m in model.modules() if isinstance(m, getattr(mod, f["attention"]))] if "attention" in f else []
    if sp_group is not None:
        for m in attention:
            _check_attention(m, family)

    patched = []
    holder = _SpGroup(sp_group, strategy=sp_strategy)
    swaps = [(m, _mixer_forward) for m in mixers]
    if sp_group is not None:
        swaps += [(m, _SP_ATTENTION[family]) for m in attention]
    for m, fwd in swaps:
        m._lasp_sp = holder
        m._lasp_family = family
        m.forward = functools.partial(fwd, m)  # see hf.patch_minimax (deepcopy / pickling)
        patched.append(m)
    handles = []
    for b in bases:  # the hook: the pieces' lengths and documents (SP, packed calls)
        b._lasp_sp = holder
        b._lasp_family = family
        b._lasp_has_full_attention = bool(attention)
        handles.append(b.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        patched.append(b)
    for top in model.modules():  # causal LMs that drop the packing arguments on the way to the model
        if isinstance(getattr(top, "backbone", None), getattr(mod, f["model"])):
            handles.append(top.register_forward_pre_hook(_lm_pre_hook, with_kwargs=True))
    setattr(model, _PATCH_ATTR, {"modules": patched, "handles": handles, "sp_group": holder, "family": family})
    return model


def unpatch_mamba2(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_mamba2 (the same as ``lasp.integrations.hf.unpatch``; returns the model)."""
    return _hf.unpatch(model)
