"""HuggingFace transformers models on lasp: ``patch(model, sp_group=None)`` / ``unpatch(model)``.

``patch`` dispatches on the model: today the MiniMax family (``patch_minimax``, also callable by name;
``SUPPORTED_MODELS`` lists what ``patch`` takes). The rest of this docstring is MiniMax's.

``patch_minimax`` swaps the linear-attention computation of every ``MiniMaxLightningAttention`` in a
transformers MiniMax model (``MiniMaxForCausalLM``, ``MiniMaxModel``, ... or any module holding them) for
``lasp.lasp_attention``, in place. Weights, buffers and results stay those of the model:

* the projections, activation, padding mask, output RMSNorm, sigmoid gate and output projection are
  transformers' own modules, called exactly as ``MiniMaxLightningAttention.forward`` calls them;
* the decay of each layer is the model's own ``slope_rate`` buffer (per head, per layer), the scale is
  1.0 (MiniMax does not scale q.k), q, k, v are read in place (layout ``bnhd``, no copies);
* MiniMax's block size only organises its loop: the function is the same for any block size, and
  lasp's kernels choose their own chunking.

Generation (``past_key_values``, a ``MiniMaxCache``): supported without a group. The linear cache of
a layer is the ``(B, H, D, D)`` state after the tokens seen so far; lasp reads it as ``initial_state``
and returns the new one (``output_final_state``), so prefill, chunked prefill and one-token decode
all run through lasp. The state is carried in float32 inside the op and stored in the cache in the
model's dtype, as transformers stores it.

Sequence parallelism (``sp_group`` = a ``torch.distributed`` group): group rank ``r`` feeds the model
the ``r``-th contiguous piece of every sequence. The linear layers pass the state along the LASP ring.
MiniMax interleaves full softmax-attention layers; under a group they are patched too and stay exact,
LASP-2H style: each rank all-gathers K and V (after rotary) along the sequence with an autograd-aware
all-gather, and attends its local queries to the gathered keys with a causal mask shifted by its global
offset (and the model's sliding window, if set). Position ids default to the *global* positions
(offset + arange): a pre-forward hook on ``MiniMaxModel`` fills them in when the caller passes none.
Under a group there is no cache (``use_cache`` defaults to False; asking for a cache raises), and a
padding ``attention_mask`` (one with zeros) is refused where the model has full-attention layers. These
refusals are agreed over the group before the first collective of a forward: when any rank's call is
refused, every rank raises the same error (naming the ranks), so none waits in a collective. The loss of
a sequence is the sum of the ranks' losses, and gradients of replicated parameters are the sum over the
group (all-reduce them, see ``examples/hf_minimax.py``).

A patched model can be ``copy.deepcopy``'d (an EMA or reference copy: the copy is patched too and shares
the sp group) and pickled with ``torch.save``. A process group does not survive pickling: a model saved
while patched with a group loads patched without one, and its forward raises until it is unpatched and
patched again with a group of the new process (a state dict is the usual way to save weights).

The code reproduced here was read from transformers 5.17.0 and checked against the MiniMax source of
the releases in ``SUPPORTED_TRANSFORMERS`` (5.16.0 to 5.22.2: from 5.18.0 on, only the zero initial
state of the block loop is built differently, which lasp does not run). Another version, or a listed
one whose MiniMax source differs (sha256 fingerprints of the reproduced functions, per release),
raises an error naming them. ``allow_untested_version=True`` skips those two checks, not the structural
ones (the classes, attributes and forward signatures relied on).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from .. import lasp_attention
from ..distributed import gather_sequence

__all__ = ["patch", "unpatch", "patch_minimax", "unpatch_minimax", "is_patched", "SUPPORTED_TRANSFORMERS",
           "SUPPORTED_MODELS"]

# sha256 of inspect.getsource(...) of the transformers functions whose behaviour is reproduced here, per
# release. A mismatch means the model code changed under the same version number (a patched install, a
# dev build): refuse rather than compute something else.
_FP_516 = {  # 5.16.0 - 5.17.0
    "MiniMaxLightningAttention.forward": "693a8e8a3970703e99d074ebdb46f2b5932a4f567800a38bd36676b457de2092",
    "MiniMaxAttention.forward": "98e841a5cfbac69612269a9ee7b0c20f1d20107da7addbdfbce1560e40c77d65",
    "MiniMaxModel.forward": "382237ec7b266339492904bfca278abeecbce56e88718939f943b280baada9a4",
    "apply_mask_to_padding_states": "ac70fe1177ec07fffda88e30269d307c4913464f169f12288b831d19a0437207",
}
# 5.18.0 - 5.22.2: the zero initial state of the block loop is built with device= / dtype= instead of .to()
_FP_518 = dict(_FP_516, **{
    "MiniMaxLightningAttention.forward": "69bc3f622840097cfc6810b4640b50455db872e89ee2a49d8bb326b65a9f88c5",
})
_FINGERPRINTS = {"5.16.0": _FP_516, "5.16.1": _FP_516, "5.17.0": _FP_516, "5.18.0": _FP_518, "5.19.0": _FP_518,
                 "5.20.2": _FP_518, "5.21.1": _FP_518, "5.22.2": _FP_518}
# The transformers releases the MiniMax integration supports (CI tests 5.17.0 and 5.22.2).
SUPPORTED_TRANSFORMERS = tuple(_FINGERPRINTS)
_SUPPORTED = ", ".join(SUPPORTED_TRANSFORMERS)

_PATCH_ATTR = "_lasp_hf_patch"

_LIGHTNING_FORWARD_PARAMS = ["self", "hidden_states", "position_embeddings", "attention_mask", "past_key_values", "kwargs"]
_ATTENTION_FORWARD_PARAMS = _LIGHTNING_FORWARD_PARAMS
_MODEL_FORWARD_PARAMS = [
    "self", "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache", "kwargs",
]
_LIGHTNING_ATTRS = (
    "layer_idx", "head_dim", "num_attention_heads", "act_fn", "norm", "qkv_proj", "out_proj", "output_gate",
    "slope_rate",
)
_ATTENTION_ATTRS = (
    "config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout", "q_proj", "k_proj",
    "v_proj", "o_proj",
)


def _err(msg: str) -> str:
    return f"lasp.integrations.hf: {msg}"


# ----------------------------------------------------------------------------------------------
# transformers and its MiniMax module, checked


def _minimax_module(allow_untested_version: bool):
    try:
        import transformers
        from transformers.models.minimax import modeling_minimax as mm
    except ImportError as e:
        raise ImportError(
            _err(f"needs HuggingFace transformers, one of {_SUPPORTED} (`pip install "
                 f"transformers=={SUPPORTED_TRANSFORMERS[-1]}`): {e}")
        ) from e
    version = transformers.__version__
    if version not in _FINGERPRINTS and not allow_untested_version:
        raise RuntimeError(
            _err(f"supports transformers {_SUPPORTED}, found {version}: MiniMax's attention code may "
                 f"differ. Install one of those, or pass allow_untested_version=True to "
                 "try anyway (the structural checks still run)")
        )
    for name in ("MiniMaxLightningAttention", "MiniMaxAttention", "MiniMaxModel", "MiniMaxCache",
                 "apply_mask_to_padding_states", "apply_rotary_pos_emb", "repeat_kv"):
        if not hasattr(mm, name):
            raise RuntimeError(
                _err(f"transformers {version} has no modeling_minimax.{name}; supported: {_SUPPORTED}")
            )
    for cls, want in ((mm.MiniMaxLightningAttention, _LIGHTNING_FORWARD_PARAMS),
                      (mm.MiniMaxAttention, _ATTENTION_FORWARD_PARAMS),
                      (mm.MiniMaxModel, _MODEL_FORWARD_PARAMS)):
        got = list(inspect.signature(cls.forward).parameters)
        if got != want:
            raise RuntimeError(
                _err(f"transformers {version}: {cls.__name__}.forward takes {got}, expected {want} "
                     f"(transformers {_SUPPORTED})")
            )
    for name in ("get_linear_cache", "set_linear_cache"):
        if not hasattr(mm.MiniMaxCache, name):
            raise RuntimeError(
                _err(f"transformers {version}: MiniMaxCache has no {name} (supported: {_SUPPORTED})")
            )
    if version in _FINGERPRINTS:
        objs = {
            "MiniMaxLightningAttention.forward": mm.MiniMaxLightningAttention.forward,
            "MiniMaxAttention.forward": mm.MiniMaxAttention.forward,
            "MiniMaxModel.forward": mm.MiniMaxModel.forward,
            "apply_mask_to_padding_states": mm.apply_mask_to_padding_states,
        }
        for key, obj in objs.items():
            want = _FINGERPRINTS[version].get(key)
            try:
                src = inspect.getsource(obj)
            except (OSError, TypeError):
                continue  # no source shipped: the version and signatures are all we can check
            got = hashlib.sha256(src.encode()).hexdigest()
            if want is not None and got != want and not allow_untested_version:
                raise RuntimeError(
                    _err(f"transformers {version}: the source of modeling_minimax.{key} differs from the released "
                         f"transformers {version} this integration reproduces (sha256 {got[:12]} vs "
                         f"{want[:12]}); install the release, or pass allow_untested_version=True")
                )
    return mm


def _mm():
    """transformers' modeling_minimax (checked by patch_minimax; looked up per call rather than kept on the
    layers, so that a patched model can be copied and pickled)."""
    from transformers.models.minimax import modeling_minimax as mm

    return mm


class _SpGroup:
    """The sp group of a patched model. A deepcopy shares it (a copy runs in the same processes); pickling
    keeps only whether there was one: a process group cannot be saved, and a model loaded from a pickle
    refuses to run as if it had none."""

    def __init__(self, group, lost: bool = False):
        self._group = group
        self._lost = lost

    @property
    def group(self):
        if self._lost:
            raise RuntimeError(
                _err("this model was pickled while patched with an sp_group, and a process group does not survive "
                     "pickling; call unpatch_minimax(model), then patch_minimax(model, sp_group=...) with a group "
                     "of this process")
            )
        return self._group

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_SpGroup, (None, self._lost or self._group is not None))


def _check_lightning(m) -> None:
    for a in _LIGHTNING_ATTRS:
        if not hasattr(m, a):
            raise RuntimeError(
                _err(f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has no attribute {a!r}; "
                     f"supported: transformers {_SUPPORTED}")
            )
    H, D = m.num_attention_heads, m.head_dim
    if tuple(m.slope_rate.shape) != (H, 1, 1):
        raise RuntimeError(
            _err(f"layer {m.layer_idx}: slope_rate has shape {tuple(m.slope_rate.shape)}, expected ({H}, 1, 1) "
                 f"(transformers {_SUPPORTED})")
        )
    if m.qkv_proj.out_features != 3 * H * D:
        raise RuntimeError(
            _err(f"layer {m.layer_idx}: qkv_proj has {m.qkv_proj.out_features} outputs, expected 3 * {H} * {D}")
        )


def _check_attention(m) -> None:
    for a in _ATTENTION_ATTRS:
        if not hasattr(m, a):
            raise RuntimeError(
                _err(f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}) has no attribute {a!r}; "
                     f"supported: transformers {_SUPPORTED}")
            )


# ----------------------------------------------------------------------------------------------
# Sequence-parallel helpers


def _group_rank_size(group):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(_err("sp_group was given but torch.distributed is not initialized"))
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(_err("this process is not a member of sp_group"))
    return dist.get_rank(group=group), dist.get_world_size(group=group)


# What a rank's call to the model asks for under a group, exchanged before the model's first collective
# so that a refusal raises on every rank (not on one while the others wait in a collective).
_CALL_OK, _CALL_CACHE, _CALL_MASK_KIND, _CALL_PADDING = 0, 1, 2, 3


def _agree_call(group, n: int, status: int, device, batch: int = -1) -> list:
    """One small all-gather of (local length, status, batch size) over the group; raises the same error on
    every rank when any rank's status is not _CALL_OK or (batch >= 0) the batch sizes differ. Returns the
    local lengths in group-rank order."""
    import torch.distributed as dist

    _, world = _group_rank_size(group)
    mine = torch.tensor([n, status, batch], dtype=torch.int64, device=device)
    allv = torch.empty(3 * world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(allv, mine, group=group)
    rows = allv.view(world, 3).tolist()
    if len({r[2] for r in rows}) > 1:
        raise ValueError(_err(f"every rank of the sequence-parallel group must pass the same batch size; got "
                              f"{[r[2] for r in rows]} in group-rank order"))
    bad = {code: [r for r, (_, st, _) in enumerate(rows) if st == code] for code in
           (_CALL_CACHE, _CALL_MASK_KIND, _CALL_PADDING)}
    if bad[_CALL_CACHE]:
        raise RuntimeError(
            _err(f"use_cache / past_key_values (generation) is not supported under a sequence-parallel group "
                 f"(asked on group ranks {bad[_CALL_CACHE]}); generate with a model patched with sp_group=None")
        )
    if bad[_CALL_MASK_KIND]:
        raise ValueError(
            _err(f"under a sequence-parallel group attention_mask must be None or a 2-D (batch, local tokens) "
                 f"padding mask of ones; custom/4-D masks are not supported (given on group ranks "
                 f"{bad[_CALL_MASK_KIND]})")
        )
    if bad[_CALL_PADDING]:
        raise ValueError(
            _err(f"padding attention masks (with zeros) are not supported under a sequence-parallel group when "
                 f"the model has full-attention layers (zeros on group ranks {bad[_CALL_PADDING]}); pack or pad "
                 f"sequences without masking")
        )
    return [int(r[0]) for r in rows]


# ----------------------------------------------------------------------------------------------
# Packed documents: several documents in one row, told apart by their position ids (transformers' rule,
# masking_utils.find_packed_sequence_indices: a document starts where a position id is not one past the
# previous token's, as DataCollatorWithFlattening makes them by restarting at 0). The lightning layers
# reset their state at every document start (log gates of -inf there: lasp_attention's g); under a group,
# the full-attention layers also mask across documents.


def _doc_starts(position_ids, B):
    """(B, n) bool: the tokens t >= 1 of each row that start a document."""
    pos = position_ids.expand(B, -1)
    starts = torch.zeros(pos.shape, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    return starts


def _reset_gates(starts, H):
    """(B, n, H) float32 log gates for layout "bnhd": -inf at the document starts, 0 elsewhere."""
    g = torch.zeros(*starts.shape, H, dtype=torch.float32, device=starts.device)
    return g.masked_fill_(starts[..., None], float("-inf"))


def _sp_documents(group, position_ids, B, lengths):
    """Under a group (every rank calls it alike): this rank's document starts (B, n), its tokens' document
    indices (B, n) and those of every token of the sequence (B, N_total), or None where no row of any piece
    holds a document start (one sequence per row). A piece's first token starts a document where its position
    id is not one past the last one of the nearest earlier non-empty piece."""
    import torch.distributed as dist

    rank, world = _group_rank_size(group)
    n = position_ids.shape[-1]
    pos = position_ids.expand(B, -1)
    dev = pos.device
    ends = torch.zeros(B, 2, dtype=torch.int64, device=dev)  # first, last position id of each row
    if n > 0:
        ends[:, 0], ends[:, 1] = pos[:, 0], pos[:, -1]
    allv = torch.empty(world * B, 2, dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(allv, ends, group=group)
    allv = allv.view(world, B, 2)
    starts = _doc_starts(pos, B)
    prev = [r for r in range(rank) if lengths[r] > 0]
    if n > 0 and prev:
        starts[:, 0] = (pos[:, 0] - allv[prev[-1], :, 1]) != 1
    counts = torch.empty(world * B, dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(counts, starts.sum(1), group=group)
    counts = counts.view(world, B)
    if int(counts.sum()) == 0:
        return None
    before = counts[:rank].sum(0)  # (B,) document starts in the earlier pieces
    ids = before[:, None] + starts.to(torch.int64).cumsum(1)
    ids_all = gather_sequence(ids, group, dim=1, sizes=lengths)
    return starts, ids, ids_all


# ----------------------------------------------------------------------------------------------
# The patched forwards


def _lightning_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """MiniMaxLightningAttention.forward (transformers 5.17.0) with the block loop replaced by lasp."""
    mm = _mm()
    group = self._lasp_sp.group
    batch_size, seq_len, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.head_dim

    qkv_states = self.act_fn(self.qkv_proj(hidden_states))
    qkv_states = mm.apply_mask_to_padding_states(qkv_states, attention_mask)
    qkv_states = qkv_states.reshape(batch_size, seq_len, H, 3 * D)
    # (B, N, H, D) strided views of the one qkv tensor; lasp reads them in place (layout "bnhd")
    query_states, key_states, value_states = torch.split(qkv_states, D, dim=3)

    # packed documents (see above): resets at every document start
    if "lasp_documents" in kwargs:  # under a group: agreed by the model's pre-hook
        docs = kwargs["lasp_documents"]
        starts = None if docs is None else docs[0]
    else:
        pos = kwargs.get("position_ids")
        starts = _doc_starts(pos, batch_size) if pos is not None and seq_len > 1 and group is None else None
        if starts is not None and not bool(starts.any()):
            starts = None
    g = None if starts is None else _reset_gates(starts, H)

    initial_state = None
    if past_key_values is not None:
        if group is not None:
            raise RuntimeError(
                _err("past_key_values (generation) is not supported under a sequence-parallel group; "
                     "generate with a model patched with sp_group=None")
            )
        cached = past_key_values.get_linear_cache(self.layer_idx)
        if cached is not None:
            acc = torch.float64 if query_states.dtype == torch.float64 else torch.float32
            initial_state = cached.to(acc)

    attn_output, state = lasp_attention(
        query_states, key_states, value_states, self.slope_rate.reshape(-1),
        scale=1.0, group=group, initial_state=initial_state, output_final_state=True, layout="bnhd", g=g,
    )
    state = state.to(value_states.dtype)  # transformers keeps the state in the model's dtype

    attn_output = attn_output.reshape(batch_size, seq_len, H * D)
    attn_output = self.norm(attn_output)
    attn_output = F.sigmoid(self.output_gate(hidden_states)) * attn_output
    attn_output = self.out_proj(attn_output)

    if past_key_values is not None:
        past_key_values.set_linear_cache(self.layer_idx, state)
    return attn_output, state


def _sp_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """MiniMaxAttention.forward under a sequence-parallel group: local queries, K and V all-gathered.

    `attention_mask` (built by the model for the local piece only) is not used: the causal (and
    sliding-window) mask is rebuilt here over global positions; the model-level hook has already
    refused padding masks.
    """
    mm = _mm()
    group = self._lasp_sp.group
    if past_key_values is not None:
        raise RuntimeError(
            _err("past_key_values (generation) is not supported under a sequence-parallel group; "
                 "generate with a model patched with sp_group=None")
        )
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings  # from the global position ids
    query_states, key_states = mm.apply_rotary_pos_emb(query_states, key_states, cos, sin)

    n = hidden_states.shape[1]
    rank, _ = _group_rank_size(group)
    lengths = _agree_call(group, n, _CALL_OK, hidden_states.device)  # every rank's local length
    offset = sum(lengths[:rank])
    # (B, Hkv, N_total, D); the backward sums each piece's gradients over the ranks (a reduce-scatter)
    key_states = gather_sequence(key_states, group, dim=2, sizes=lengths)
    value_states = gather_sequence(value_states, group, dim=2, sizes=lengths)
    key_states = mm.repeat_kv(key_states, self.num_key_value_groups)
    value_states = mm.repeat_kv(value_states, self.num_key_value_groups)

    q_pos = torch.arange(offset, offset + n, device=hidden_states.device)[:, None]
    k_pos = torch.arange(sum(lengths), device=hidden_states.device)[None, :]
    allowed = k_pos <= q_pos
    window = getattr(self.config, "sliding_window", None)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)  # transformers' sliding_window_overlay
    docs = kwargs.get("lasp_documents")
    if docs is not None:  # packed documents: a query sees its own document only, (B, 1, n, N_total)
        _, ids, ids_all = docs
        allowed = (allowed[None] & (ids[:, :, None] == ids_all[:, None, :]))[:, None]

    attn_output = F.scaled_dot_product_attention(
        query_states, key_states, value_states, attn_mask=allowed,
        dropout_p=0.0 if not self.training else float(self.attention_dropout), scale=self.scaling,
    )
    attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, None


def _model_pre_hook(module, args, kwargs):
    """MiniMaxModel pre-forward hook under a group: global position ids, no cache, no padding. What the
    call asks for is agreed over the group first (_agree_call): a refusal raises on every rank."""
    group = module._lasp_sp.group
    sig = inspect.signature(type(module).forward)
    bound = sig.bind_partial(module, *args, **kwargs)
    call = dict(bound.arguments)
    call.pop("self", None)
    extra = call.pop("kwargs", {})
    call.update(extra)

    ref = call.get("inputs_embeds") if call.get("inputs_embeds") is not None else call.get("input_ids")
    if ref is None:
        raise ValueError(_err("input_ids or inputs_embeds is required"))
    status = _CALL_OK
    mask = call.get("attention_mask")
    if call.get("past_key_values") is not None or call.get("use_cache"):
        status = _CALL_CACHE
    elif mask is not None and module._lasp_has_full_attention:
        if isinstance(mask, dict) or mask.dim() != 2:
            status = _CALL_MASK_KIND
        elif not bool(torch.all(mask == 1)):
            status = _CALL_PADDING
    n = ref.shape[1]
    lengths = _agree_call(group, n, status, ref.device, batch=ref.shape[0])
    call["use_cache"] = False

    if call.get("position_ids") is None:
        rank, _ = _group_rank_size(group)
        offset = sum(lengths[:rank])
        call["position_ids"] = torch.arange(offset, offset + n, device=ref.device).unsqueeze(0)
    # packed documents, agreed over the group (every layer reads them from its kwargs)
    call["lasp_documents"] = _sp_documents(group, call["position_ids"], ref.shape[0], lengths)
    return (), call


# ----------------------------------------------------------------------------------------------
# Public API


def patch_minimax(model: torch.nn.Module, sp_group=None, *, allow_untested_version: bool = False) -> torch.nn.Module:
    """Run the linear attention of a transformers MiniMax model through lasp (in place; returns the model).

    Args:
        model: a transformers MiniMax model (MiniMaxForCausalLM, MiniMaxModel, ...) or any module that holds
            MiniMaxLightningAttention layers.
        sp_group: None, or a torch.distributed ProcessGroup over which each sequence is split (group rank r
            passes the r-th contiguous piece). Its full-attention layers then all-gather K and V; position
            ids default to the global positions; no cache, no padding masks with full-attention layers.
        allow_untested_version: run on a transformers not in SUPPORTED_TRANSFORMERS (at your own risk).
    """
    mm = _minimax_module(allow_untested_version)
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise RuntimeError(_err("model is already patched; call unpatch_minimax(model) first"))
    if sp_group is not None:
        _group_rank_size(sp_group)

    lightning = [m for m in model.modules() if isinstance(m, mm.MiniMaxLightningAttention)]
    if not lightning:
        raise ValueError(_err(f"no MiniMaxLightningAttention found in {type(model).__name__}"))
    full = [m for m in model.modules() if isinstance(m, mm.MiniMaxAttention)] if sp_group is not None else []
    bases = [m for m in model.modules() if isinstance(m, mm.MiniMaxModel)] if sp_group is not None else []
    for m in lightning:
        _check_lightning(m)
    for m in full:
        _check_attention(m)

    patched = []  # (module, original forward attribute or None)
    holder = _SpGroup(sp_group)
    for m, fwd in [(m, _lightning_forward) for m in lightning] + [(m, _sp_attention_forward) for m in full]:
        m._lasp_sp = holder
        # instance attribute that nn.Module.__call__ calls; a partial of a module-level function (not a bound
        # method), so that deepcopy rebinds it to the copied layer and pickling finds it by name
        m.forward = functools.partial(fwd, m)
        patched.append(m)
    handles = []
    for b in bases:
        b._lasp_sp = holder
        b._lasp_has_full_attention = bool(full)
        handles.append(b.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        patched.append(b)
    setattr(model, _PATCH_ATTR, {"modules": patched, "handles": handles, "sp_group": holder})
    return model


def unpatch_minimax(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_minimax: the model computes with transformers' own code again (returns the model)."""
    state = getattr(model, _PATCH_ATTR, None)
    if state is None:
        raise ValueError(_err("model is not patched (patch_minimax was not called on it)"))
    for h in state["handles"]:
        h.remove()
    for m in state["modules"]:
        for a in ("forward", "_lasp_sp", "_lasp_has_full_attention"):
            m.__dict__.pop(a, None)
    delattr(model, _PATCH_ATTR)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _PATCH_ATTR, None) is not None


# The model families patch() takes: family -> (the transformers layer class it swaps, the patch function).
SUPPORTED_MODELS = {"minimax": "MiniMaxLightningAttention"}


def patch(model: torch.nn.Module, sp_group=None, *, allow_untested_version: bool = False) -> torch.nn.Module:
    """Run the linear-attention layers of a supported transformers model through lasp (in place; returns
    the model). Dispatches on the layers the model holds (``SUPPORTED_MODELS``); for MiniMax this is
    :func:`patch_minimax`, whose arguments it takes. Raises ValueError naming the supported families when
    the model holds none of their layers."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(_err(f"patch: model must be a torch.nn.Module, got {type(model).__name__}"))
    names = {type(m).__name__ for m in model.modules()}
    if SUPPORTED_MODELS["minimax"] in names:
        return patch_minimax(model, sp_group, allow_untested_version=allow_untested_version)
    raise ValueError(
        _err(f"patch: {type(model).__name__} holds no layer lasp can swap; supported families (layer class): "
             + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items()))
    )


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` (returns the model)."""
    return unpatch_minimax(model)

