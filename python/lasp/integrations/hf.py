"""HuggingFace transformers models on lasp: ``patch(model, sp_group=None)`` / ``unpatch(model)``.

``patch`` dispatches on the model: the MiniMax family (``patch_minimax``, also callable by name), the
Gated DeltaNet families Qwen3-Next, Qwen3.5 / Qwen3.5-MoE and OLMo hybrid (``hf_delta.patch_gated_deltanet``,
see that module) and the Mamba-2 families Mamba2, Bamba, NemotronH, GraniteMoeHybrid, Zamba2 and FalconH1
(``hf_mamba2.patch_mamba2``); ``SUPPORTED_MODELS`` lists what ``patch`` takes. The rest of this docstring is MiniMax's.

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

Packed documents (several documents in one row): told apart by position ids that restart at every document,
or by transformers' flash-attention keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (with
``max_length_q`` / ``max_length_k``, accepted and not read), as ``DataCollatorWithFlattening`` makes them. The
lightning layers reset their state at every document start; the full-attention layers keep documents apart
(without a group through transformers' own mask, under a group through lasp's). With ``cu_seq_lens_q``: one
row (batch size 1), ``cu_seq_lens_k`` equal to it where given, position ids (where given) restarting exactly
at its offsets and otherwise made from them, no cache and, with full-attention layers, no padding; each rule
broken raises an error naming the argument. Under a group ``cu_seq_lens_q`` holds the *global* offsets of the
whole packed row (as ``lasp_attention``'s ``cu_seqlens``), the same tensor on every rank, and the checks are
agreed over the group: a bad call raises on every rank. See docs/hf.md.

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

import torch
import torch.nn.functional as F

from .. import lasp_attention
from ..distributed import _cu_signature, _gather_rows, _raise_if_invalid, gather_sequence

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


def _checked_module(module: str, *, for_what: str, untested: str, names, signatures, fingerprints, objects,
                    allow_untested_version: bool, source_of=inspect.getsource):
    """transformers' ``transformers.models.<module>``, checked before any patch: the installed version is a
    supported one (``untested``: the error's text otherwise, unless allow_untested_version), the module has
    ``names``, each ``(class name, expected forward parameters)`` of ``signatures`` matches, and on a
    supported version the source of each of ``objects(mod)`` (a dict key -> object) hashes to
    ``fingerprints[version][key]`` (sha256); the supported versions are the keys of ``fingerprints``.
    ``for_what``: what the import error says it is needed for."""
    import importlib

    supported = ", ".join(fingerprints)
    try:
        import transformers

        mod = importlib.import_module("transformers.models." + module)
    except ImportError as e:
        raise ImportError(
            _err(f"needs HuggingFace transformers, one of {supported}{for_what} (`pip install "
                 f"transformers=={list(fingerprints)[-1]}`): {e}")
        ) from e
    version = transformers.__version__
    if version not in fingerprints and not allow_untested_version:
        raise RuntimeError(_err(untested.format(version=version)))
    short = module.rsplit(".", 1)[-1]
    for name in names:
        if not hasattr(mod, name):
            raise RuntimeError(_err(f"transformers {version} has no {short}.{name}; supported: {supported}"))
    for cls_name, want in signatures:
        cls = getattr(mod, cls_name)
        got = list(inspect.signature(cls.forward).parameters)
        if got != want:
            raise RuntimeError(
                _err(f"transformers {version}: {cls.__name__}.forward takes {got}, expected {want} "
                     f"(transformers {supported})")
            )
    if version in fingerprints:
        for key, obj in objects(mod).items():
            want = fingerprints[version].get(key)
            try:
                src = source_of(obj)
            except (OSError, TypeError):
                continue  # no source shipped: the version and signatures are all we can check
            got = hashlib.sha256(src.encode()).hexdigest()
            if want is not None and got != want and not allow_untested_version:
                raise RuntimeError(
                    _err(f"transformers {version}: the source of {short}.{key} differs from the released "
                         f"transformers {version} this integration reproduces (sha256 {got[:12]} vs "
                         f"{want[:12]}); install the release, or pass allow_untested_version=True")
                )
    return mod


def _minimax_module(allow_untested_version: bool):
    mm = _checked_module(
        "minimax.modeling_minimax", for_what="",
        untested=(f"supports transformers {_SUPPORTED}, found {{version}}: MiniMax's attention code may differ. "
                  "Install one of those, or pass allow_untested_version=True to try anyway (the structural "
                  "checks still run)"),
        names=("MiniMaxLightningAttention", "MiniMaxAttention", "MiniMaxModel", "MiniMaxCache",
               "apply_mask_to_padding_states", "apply_rotary_pos_emb", "repeat_kv"),
        signatures=(("MiniMaxLightningAttention", _LIGHTNING_FORWARD_PARAMS),
                    ("MiniMaxAttention", _ATTENTION_FORWARD_PARAMS), ("MiniMaxModel", _MODEL_FORWARD_PARAMS)),
        fingerprints=_FINGERPRINTS,
        objects=lambda mm: {
            "MiniMaxLightningAttention.forward": mm.MiniMaxLightningAttention.forward,
            "MiniMaxAttention.forward": mm.MiniMaxAttention.forward,
            "MiniMaxModel.forward": mm.MiniMaxModel.forward,
            "apply_mask_to_padding_states": mm.apply_mask_to_padding_states,
        },
        allow_untested_version=allow_untested_version)
    import transformers

    for name in ("get_linear_cache", "set_linear_cache"):
        if not hasattr(mm.MiniMaxCache, name):
            raise RuntimeError(
                _err(f"transformers {transformers.__version__}: MiniMaxCache has no {name} (supported: {_SUPPORTED})")
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

    def __init__(self, group, lost: bool = False, strategy: str = "ring"):
        self._group = group
        self._lost = lost
        self.strategy = strategy  # how the linear-attention ops pass states across the group

    @property
    def group(self):
        if self._lost:
            raise RuntimeError(
                _err("this model was pickled while patched with an sp_group, and a process group does not survive "
                     "pickling; call unpatch(model), then patch(model, sp_group=...) with a group of this process")
            )
        return self._group

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_SpGroup, (None, self._lost or self._group is not None, self.strategy))


def _families_in(model, families: dict, key: str) -> list:
    """The names of ``families`` (name -> {"module": transformers.models.<module>, key: class name}) whose class the
    model holds; families whose module does not import are skipped."""
    import importlib

    found = []
    for fam, f in families.items():
        try:
            mod = importlib.import_module("transformers.models." + f["module"])
        except ImportError:
            continue
        cls = getattr(mod, f[key], None)
        if cls is not None and any(isinstance(m, cls) for m in model.modules()):
            found.append(fam)
    return found


def _check_strategy(sp_strategy) -> None:
    from ..distributed import STRATEGY_CHOICES

    if not isinstance(sp_strategy, str) or sp_strategy not in STRATEGY_CHOICES:
        raise ValueError(_err(f"sp_strategy must be one of {STRATEGY_CHOICES}, got {sp_strategy!r}"))


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


def _agree_call(group, n: int, status: int, device, batch: int = -1, packed: int = 0) -> list:
    """One small all-gather of (local length, status, batch size, packed) over the group; raises the same error
    on every rank when any rank's status is not _CALL_OK, (batch >= 0) the batch sizes differ, or some ranks
    pass packed-document offsets (cu_seq_lens_q / cu_seq_lens_k; packed=1) and others do not. Returns the local
    lengths in group-rank order."""
    import torch.distributed as dist

    _, world = _group_rank_size(group)
    mine = torch.tensor([n, status, batch, packed], dtype=torch.int64, device=device)
    allv = torch.empty(4 * world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(allv, mine, group=group)
    rows = allv.view(world, 4).tolist()
    if len({r[2] for r in rows}) > 1:
        raise ValueError(_err(f"every rank of the sequence-parallel group must pass the same batch size; got "
                              f"{[r[2] for r in rows]} in group-rank order"))
    bad = {code: [r for r, (_, st, _, _) in enumerate(rows) if st == code] for code in
           (_CALL_CACHE, _CALL_MASK_KIND, _CALL_PADDING)}
    if bad[_CALL_CACHE]:
        raise RuntimeError(
            _err(f"use_cache / past_key_values / cache_params (generation) is not supported under a sequence-parallel "
                 f"group (asked on group ranks {bad[_CALL_CACHE]}); generate with a model patched with sp_group=None")
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
    _agree_packed([r[3] for r in rows])
    return [int(r[0]) for r in rows]


def _agree_packed(flags: list) -> bool:
    """Whether the call is packed (cu_seq_lens_q given), from every group rank's flag; raises the same error on
    every rank when the ranks disagree."""
    given = [r for r, f in enumerate(flags) if f]
    if given and len(given) != len(flags):
        raise ValueError(
            _err(f"cu_seq_lens_q / cu_seq_lens_k (packed documents) must be passed on every rank of the "
                 f"sequence-parallel group or on none; given on group ranks {given} of {len(flags)}")
        )
    return bool(given)


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
# Packed documents given by their offsets: transformers' flash-attention keyword arguments cu_seq_lens_q /
# cu_seq_lens_k (and max_length_q / max_length_k, which lasp does not need), as
# DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them for one flattened row: int32 offsets
# [0, n_1, n_1 + n_2, ..., N]. They are the *global* offsets of the whole packed row, also under a group
# (as lasp_attention's cu_seqlens): every rank passes the same tensor along with its piece of the row.


def _offsets(name: str, t) -> torch.Tensor:
    """Document offsets ``t`` (the argument ``name``), checked: a CPU int64 tensor [0, ..., N], strictly
    increasing. Each violation raises an error naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(_err(f"{name} must be a torch.Tensor of document offsets [0, ..., N] (int32 or int64), "
                             f"got {type(t).__name__}"))
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(_err(f"{name} must hold int32 or int64 document offsets, got {t.dtype}"))
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(_err(f"{name} must be 1-D with at least 2 offsets [0, ..., N], got shape {tuple(t.shape)}"))
    cu = t.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(_err(f"{name} must start at 0, got {int(cu[0])}"))
    steps = cu[1:] - cu[:-1]
    if bool((steps <= 0).any()):
        i = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(_err(f"{name} must be strictly increasing (no empty documents), got {name}[{i}] = "
                              f"{int(cu[i])} and {name}[{i + 1}] = {int(cu[i + 1])}"))
    return cu


def _check_packed_args(cu_q, cu_k, B: int) -> torch.Tensor:
    """The checked offsets of a packed call (from cu_seq_lens_q; cu_seq_lens_k, where given, must equal them)."""
    if cu_q is None:
        raise ValueError(_err("cu_seq_lens_k was given without cu_seq_lens_q; pass both (equal: the linear "
                              "layers are causal self-attention over one packed row)"))
    cu = _offsets("cu_seq_lens_q", cu_q)
    if B != 1:
        raise ValueError(_err(f"cu_seq_lens_q (packed documents) needs one packed row, batch size 1; got batch "
                              f"size {B}. Flatten the batch into one row (DataCollatorWithFlattening does)"))
    if cu_k is not None:
        cuk = _offsets("cu_seq_lens_k", cu_k)
        if cuk.shape != cu.shape or not torch.equal(cuk, cu):
            raise ValueError(_err(f"cu_seq_lens_q and cu_seq_lens_k must be equal for lasp's layers (causal "
                                  f"self-attention over the same packed documents); got {cu.tolist()} and "
                                  f"{cuk.tolist()}"))
    return cu


def _packed_documents(group, cu_q, cu_k, position_ids, B: int, n: int, device):
    """The documents of a packed call with offsets cu_seq_lens_q (global, the same on every rank of ``group``).

    Under a group every rank calls it alike; its checks are agreed over the group (one small all-gather, and a
    second one where position ids are given), so that a bad call raises on every rank. Returns ``(docs,
    positions)``: ``docs`` is ``lasp_documents`` (this piece's document starts (1, n) bool, its tokens'
    document indices (1, n) and those of every token of the row (1, N)), None for a single document;
    ``positions`` (1, n) are the tokens' positions inside their documents (the position ids
    DataCollatorWithFlattening makes), on ``device``."""
    cu, err = None, None
    try:
        cu = _check_packed_args(cu_q, cu_k, B)
    except (TypeError, ValueError) as e:
        err = e
    pos = None
    if err is None and position_ids is not None:
        pos = position_ids.expand(B, -1)[0].detach().to("cpu", torch.int64)
    if group is None:
        if err is not None:
            raise err
        rows, rank = [[n, 1, int(pos is not None), 0, 0]], 0
    else:
        ends = [int(pos[0]), int(pos[-1])] if pos is not None and n > 0 else [0, 0]
        rows, rank = _gather_rows(group, [n, int(err is None), int(pos is not None)] + ends + _cu_signature(cu))
        _raise_if_invalid(rows, 1, err, _err("cu_seq_lens_q"))
        differ = [i for i, r in enumerate(rows) if r[5:] != rows[0][5:]]
        if differ:
            raise ValueError(_err(f"cu_seq_lens_q must be the same on every rank of the sequence-parallel group (the "
                                  f"global document offsets of the whole packed row); group ranks {differ} differ "
                                  f"from group rank 0"))
    lengths = [int(r[0]) for r in rows]
    total, offset = sum(lengths), sum(lengths[:rank])
    if int(cu[-1]) != total:  # cu and the lengths are the same on every rank: all raise alike
        where = "" if group is None else ", the sum of the pieces' lengths over the group"
        raise ValueError(_err(f"the last offset of cu_seq_lens_q ({int(cu[-1])}) must equal the packed length "
                              f"({total}{where}); cu_seq_lens_q holds the offsets of the whole packed row"))
    tokens = torch.arange(total, dtype=torch.int64)
    ids_all = torch.searchsorted(cu, tokens, right=True) - 1  # every token's document
    ids = ids_all[offset:offset + n]
    positions = tokens[offset:offset + n] - cu[ids]
    starts = (positions == 0) & (tokens[offset:offset + n] > 0)

    if any(r[2] for r in rows):  # position ids given (on some rank): they must start documents where cu does
        bad = -1
        if pos is not None and n > 0:
            pos_starts = torch.zeros(n, dtype=torch.bool)
            pos_starts[1:] = (pos[1:] - pos[:-1]) != 1
            prev = [r for r in range(rank) if lengths[r] > 0]
            check_first = bool(prev) and rows[prev[-1]][2] == 1
            if check_first:
                pos_starts[0] = int(pos[0]) - rows[prev[-1]][4] != 1
            differ = torch.nonzero(pos_starts != starts).flatten()
            differ = differ[differ > 0] if not check_first else differ
            if differ.numel():
                bad = offset + int(differ[0])
        verdict = [[bad]] if group is None else _gather_rows(group, [bad])[0]
        wrong = [(i, v[0]) for i, v in enumerate(verdict) if v[0] >= 0]
        if wrong:
            t = wrong[0][1]
            d = int(ids_all[t])
            says = (f"cu_seq_lens_q starts document {d} there" if int(cu[d]) == t else
                    f"cu_seq_lens_q puts it inside document {d}, which starts at token {int(cu[d])}")
            ranks = "" if group is None else f" (on group ranks {[i for i, _ in wrong]})"
            raise ValueError(_err(f"position_ids and cu_seq_lens_q disagree about where the packed documents "
                                  f"start{ranks}: at token {t} of the packed row the position ids "
                                  f"{'do not ' if int(cu[d]) == t else ''}restart (a document starts where a "
                                  f"position id is not one past the previous token's), while {says}. Pass "
                                  f"position ids that restart at every document (or none: they are then made "
                                  f"from cu_seq_lens_q)"))
    positions = positions[None].to(device)
    if cu.numel() <= 2:
        return None, positions
    return (starts[None].to(device), ids[None].to(device), ids_all[None].to(device)), positions


def _layer_documents(group, kwargs, B: int, n: int, device):
    """A patched layer called with cu_seq_lens_q / cu_seq_lens_k but without the model's pre-hook (the layer
    called on its own): ``(packed, docs)``. Under a group whether the call is packed is agreed first."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    packed = cu_q is not None or cu_k is not None
    if group is not None:
        rows, _ = _gather_rows(group, [int(packed)])
        packed = _agree_packed([r[0] for r in rows])
    if not packed:
        return False, None
    docs, _ = _packed_documents(group, cu_q, cu_k, kwargs.get("position_ids"), B, n, device)
    return True, docs


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
    if "lasp_documents" in kwargs:  # set by the model's pre-hook (under a group: agreed over it)
        docs = kwargs["lasp_documents"]
        starts = None if docs is None else docs[0]
    else:
        packed, docs = _layer_documents(group, kwargs, batch_size, seq_len, hidden_states.device)
        if packed:  # cu_seq_lens_q given to the layer itself
            if past_key_values is not None:
                raise ValueError(_err("cu_seq_lens_q (packed documents) cannot be used with past_key_values: a "
                                      "cache holds one state per row, a packed row holds several documents"))
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
        strategy=self._lasp_sp.strategy,
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

    attn_output = _sp_sdpa(self, group, query_states, key_states, value_states, kwargs,
                           window=getattr(self.config, "sliding_window", None))
    attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, None


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * n_rep, N, D), each head repeated n_rep times in place (transformers' repeat_kv)."""
    if n_rep == 1:
        return x
    B, H, N, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, N, D).reshape(B, H * n_rep, N, D)


def _sp_sdpa(self, group, query_states, key_states, value_states, kwargs, *, window=None, lengths=None):
    """Softmax attention of this rank's queries (B, H, n, D) over the whole sequence's keys and values, under
    a sequence-parallel group (LASP-2H): K and V (B, Hkv, n, D), after any rotary, are all-gathered along the
    sequence with an autograd-aware all-gather (its backward sums each piece's gradients over the ranks), and
    the causal mask (with the sliding ``window``, if any, and packed documents) is built over global positions.

    ``self`` supplies ``num_key_value_groups``, ``scaling``, ``attention_dropout`` and ``training``;
    ``lengths``: every rank's local length (None: agreed here with one small all-gather); ``kwargs``: the
    layer's keyword arguments (``lasp_documents`` from the model's pre-hook, or ``cu_seq_lens_q``).
    Returns the (B, H, n, D) attention output."""
    B, _, n, _ = query_states.shape
    device = query_states.device
    rank, _ = _group_rank_size(group)
    if lengths is None:
        lengths = _agree_call(group, n, _CALL_OK, device)  # every rank's local length
    offset = sum(lengths[:rank])
    # (B, Hkv, N_total, D); the backward sums each piece's gradients over the ranks (a reduce-scatter)
    key_states = gather_sequence(key_states, group, dim=2, sizes=lengths)
    value_states = gather_sequence(value_states, group, dim=2, sizes=lengths)
    key_states = _repeat_kv(key_states, self.num_key_value_groups)
    value_states = _repeat_kv(value_states, self.num_key_value_groups)

    q_pos = torch.arange(offset, offset + n, device=device)[:, None]
    k_pos = torch.arange(sum(lengths), device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)  # transformers' sliding_window_overlay
    if "lasp_documents" in kwargs:  # set by the model's pre-hook
        docs = kwargs["lasp_documents"]
    else:  # the layer called on its own: cu_seq_lens_q, where given, tells the documents apart
        docs = _layer_documents(group, kwargs, B, n, device)[1]
    if docs is not None:  # packed documents: a query sees its own document only, (B, 1, n, N_total)
        _, ids, ids_all = docs
        allowed = (allowed[None] & (ids[:, :, None] == ids_all[:, None, :]))[:, None]

    return F.scaled_dot_product_attention(
        query_states, key_states, value_states, attn_mask=allowed,
        dropout_p=0.0 if not self.training else float(self.attention_dropout), scale=self.scaling,
    )


def _hook_call(module, args, kwargs):
    """The arguments of a call of a hooked model's forward as one dict (its ``**kwargs`` merged in), whether the
    call is packed (cu_seq_lens_q / cu_seq_lens_k given) and the input it reads (inputs_embeds, else input_ids;
    None where neither is given)."""
    sig = inspect.signature(type(module).forward)
    call = dict(sig.bind_partial(module, *args, **kwargs).arguments)
    call.pop("self", None)
    call.update(call.pop("kwargs", {}))
    packed = call.get("cu_seq_lens_q") is not None or call.get("cu_seq_lens_k") is not None
    ref = call.get("inputs_embeds") if call.get("inputs_embeds") is not None else call.get("input_ids")
    return call, packed, ref


def _asks_cache(call) -> bool:
    """Whether a hooked call asks for a cache: use_cache, or a cache given (past_key_values; Mamba-2's cache_params)."""
    return (call.get("past_key_values") is not None or call.get("cache_params") is not None
            or bool(call.get("use_cache")))


def _settle_call(module, group, call, packed: bool, B: int, n: int, device, cache_advice: str):
    """The checks of a model pre-forward hook on a packed call or a call under a group; updates ``call`` in place.

    Without a group (a packed call): a cache is refused (``cache_advice`` ends the error) and, where the model has
    full-attention layers, any mask but a 2-D mask of ones, which is dropped (transformers' mask reads packed
    position ids only without one). Under a group: what the call asks for (cache, mask kind, padding) is agreed
    over the group (_agree_call): a refusal raises on every rank. Then the cache is turned off. Returns every
    rank's local length (None without a group)."""
    mask = call.get("attention_mask")
    if group is None:
        if _asks_cache(call):
            raise ValueError(_err("cu_seq_lens_q (packed documents) cannot be used with a cache (use_cache=True / "
                                  "past_key_values): a cache holds one state per row, a packed row holds several "
                                  f"documents; {cache_advice}"))
        if mask is not None and module._lasp_has_full_attention:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not bool(torch.all(mask == 1)):
                raise ValueError(_err("with cu_seq_lens_q (packed documents), attention_mask must be None or a 2-D "
                                      "mask of ones: the documents are told apart by cu_seq_lens_q, and a packed "
                                      "row has no padding"))
            call["attention_mask"] = None  # no padding; transformers reads packed position ids only without a mask
        lengths = None
    else:
        status = _CALL_OK
        if _asks_cache(call):
            status = _CALL_CACHE
        elif mask is not None and module._lasp_has_full_attention:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                status = _CALL_MASK_KIND
            elif not bool(torch.all(mask == 1)):
                status = _CALL_PADDING
        lengths = _agree_call(group, n, status, device, batch=B, packed=int(packed))
    call["use_cache"] = False
    return lengths


def _keep_packed_apart(call, starts):
    """A call on one device whose position ids restart (packed documents found in them, ``starts`` (B, n) bool, no
    cu_seq_lens_q) to a model with full-attention layers: make transformers' own attention keep the documents
    apart, or refuse the call. transformers' causal mask cuts at documents (its packed-sequence detection from the
    position ids) only without a cache and without an attention mask, so an all-ones 2-D attention_mask is
    dropped; a padding mask with zeros is refused where the position ids restart between two unpadded tokens (a
    document start inside the padding mask, which transformers' mask does not cut; restarts next to padding, as
    in left-padded generation, are left as they are); another (4-D, custom) mask is the caller's own and is used
    as given; a cache (use_cache=True, past_key_values) is refused, and the cache is turned off otherwise (the
    config's default would make one). Updates ``call`` in place and returns it."""
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if bool(torch.all(mask == 1)):
            call["attention_mask"] = mask = None
        else:
            m = mask.to(torch.bool).to(starts.device)
            inside = starts[:, 1:] & m[:, 1:] & m[:, :-1]
            if bool(inside.any()):
                b, t = (int(i) for i in torch.nonzero(inside)[0])
                raise ValueError(_err(
                    f"position_ids restart at token {t + 1} of row {b} (a packed document starts there) while "
                    "attention_mask has zeros: transformers' attention mask keeps packed documents apart only "
                    "without an attention mask. Pass attention_mask=None for packed rows (or cu_seq_lens_q)"))
            return call  # restarts next to padding only: transformers' padding mask, as given
    if mask is not None:
        return call  # a 4-D / custom mask: the caller's own
    if _asks_cache(call):
        raise ValueError(_err(
            "position_ids restart (packed documents) but a cache was asked for (use_cache=True / "
            "past_key_values): transformers' attention mask keeps packed documents apart only without a cache, "
            "and a cache holds one state per row. Pass use_cache=False (or leave it unset) for packed rows"))
    call["use_cache"] = False
    return call


def _call_documents(group, call, packed: bool, positions, B: int, n: int, lengths, device):
    """The documents of a settled call (_settle_call) for the layers, as ``call["lasp_documents"]``; returns the
    hook's ``(args, kwargs)``. ``positions``: the (text) position ids given, or None.

    Packed (cu_seq_lens_q): the documents from the offsets (global under a group), and the position ids made
    from them where none are given. Otherwise (under a group): position ids default to the global positions,
    and documents where they restart, agreed over the group."""
    if packed:
        docs, made = _packed_documents(group, call.get("cu_seq_lens_q"), call.get("cu_seq_lens_k"), positions, B, n,
                                       device)
        if call.get("position_ids") is None:
            call["position_ids"] = made
        call["lasp_documents"] = docs
        return (), call
    if positions is None:
        rank, _ = _group_rank_size(group)
        offset = sum(lengths[:rank])
        positions = call["position_ids"] = torch.arange(offset, offset + n, device=device).unsqueeze(0)
    call["lasp_documents"] = _sp_documents(group, positions, B, lengths)
    return (), call


def _model_pre_hook(module, args, kwargs):
    """MiniMaxModel pre-forward hook.

    Under a group: global position ids, no cache, no padding; what the call asks for is agreed over the group
    first (_agree_call): a refusal raises on every rank. Packed documents (position ids restarting, or
    cu_seq_lens_q) are agreed over the group and handed to every layer as ``lasp_documents``.

    Without a group it acts on packed calls only (other calls pass unchanged). With cu_seq_lens_q /
    cu_seq_lens_k: it checks them, makes the position ids from them where none are given (so that transformers'
    own full-attention layers, which read packed documents from the position ids, mask across documents), turns
    the cache off and drops an all-ones padding mask (transformers' mask reads packed position ids only without
    either), and hands the documents to the linear layers. With restarting position ids alone, on a model with
    full-attention layers: the same for the mask and the cache (_keep_packed_apart)."""
    group = module._lasp_sp.group
    call, packed, ref = _hook_call(module, args, kwargs)
    if group is None and not packed:
        # position ids restarting (packed documents): the linear layers read them; the full-attention layers need
        # transformers' mask to see them (_keep_packed_apart)
        pos = call.get("position_ids")
        if ref is None or not module._lasp_has_full_attention or not isinstance(pos, torch.Tensor) or pos.dim() != 2:
            return None
        B, n = ref.shape[0], ref.shape[1]
        if n < 2 or pos.shape[-1] != n:
            return None
        starts = _doc_starts(pos, B)
        if not bool(starts.any()):
            return None
        return (), _keep_packed_apart(call, starts)
    if ref is None:
        raise ValueError(_err("input_ids or inputs_embeds is required"))
    B, n = ref.shape[0], ref.shape[1]
    lengths = _settle_call(module, group, call, packed, B, n, ref.device, "leave use_cache unset or False")
    return _call_documents(group, call, packed, call.get("position_ids"), B, n, lengths, ref.device)


# ----------------------------------------------------------------------------------------------
# Public API


def patch_minimax(model: torch.nn.Module, sp_group=None, *, sp_strategy: str = "ring",
                  allow_untested_version: bool = False) -> torch.nn.Module:
    """Run the linear attention of a transformers MiniMax model through lasp (in place; returns the model).

    Args:
        model: a transformers MiniMax model (MiniMaxForCausalLM, MiniMaxModel, ...) or any module that holds
            MiniMaxLightningAttention layers.
        sp_group: None, or a torch.distributed ProcessGroup over which each sequence is split (group rank r
            passes the r-th contiguous piece). Its full-attention layers then all-gather K and V; position
            ids default to the global positions; no cache, no padding masks with full-attention layers.
        sp_strategy: how the lightning layers pass their states across sp_group: "ring" (default),
            "allgather", "scan" or "auto" (lasp_attention's strategy).
        allow_untested_version: run on a transformers not in SUPPORTED_TRANSFORMERS (at your own risk).
    """
    mm = _minimax_module(allow_untested_version)
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise RuntimeError(_err("model is already patched; call unpatch_minimax(model) first"))
    _check_strategy(sp_strategy)
    if sp_group is not None:
        _group_rank_size(sp_group)

    lightning = [m for m in model.modules() if isinstance(m, mm.MiniMaxLightningAttention)]
    if not lightning:
        raise ValueError(_err(f"no MiniMaxLightningAttention found in {type(model).__name__}"))
    all_full = [m for m in model.modules() if isinstance(m, mm.MiniMaxAttention)]
    full = all_full if sp_group is not None else []  # without a group transformers' own full attention runs
    # the pre-forward hook: under a group on every call; without one on packed calls (cu_seq_lens_q) only
    bases = [m for m in model.modules() if isinstance(m, mm.MiniMaxModel)]
    for m in lightning:
        _check_lightning(m)
    for m in full:
        _check_attention(m)

    patched = []  # (module, original forward attribute or None)
    holder = _SpGroup(sp_group, strategy=sp_strategy)
    for m, fwd in [(m, _lightning_forward) for m in lightning] + [(m, _sp_attention_forward) for m in full]:
        m._lasp_sp = holder
        # instance attribute that nn.Module.__call__ calls; a partial of a module-level function (not a bound
        # method), so that deepcopy rebinds it to the copied layer and pickling finds it by name
        m.forward = functools.partial(fwd, m)
        patched.append(m)
    handles = []
    for b in bases:
        b._lasp_sp = holder
        b._lasp_has_full_attention = bool(all_full)
        handles.append(b.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        patched.append(b)
    setattr(model, _PATCH_ATTR, {"modules": patched, "handles": handles, "sp_group": holder})
    return model


def unpatch_minimax(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_minimax: the model computes with transformers' own code again (returns the model)."""
    state = getattr(model, _PATCH_ATTR, None)
    if state is None:
        raise ValueError(_err("model is not patched (patch_minimax was not called on it)"))
    return _unpatch(model, state)


# Instance attributes a patch sets on the modules it swaps (removed again by unpatch)
_PATCH_MODULE_ATTRS = ("forward", "_lasp_sp", "_lasp_has_full_attention", "_lasp_family", "_lasp_pending")


def _unpatch(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    for h in state["handles"]:
        h.remove()
    for m in state["modules"]:
        for a in _PATCH_MODULE_ATTRS:
            m.__dict__.pop(a, None)
    delattr(model, _PATCH_ATTR)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _PATCH_ATTR, None) is not None


# The model families patch() takes: family -> the transformers layer class it swaps for lasp. MiniMax:
# patch_minimax; the Gated DeltaNet families: lasp.integrations.hf_delta.patch_gated_deltanet; the Mamba-2
# families: lasp.integrations.hf_mamba2.patch_mamba2.
SUPPORTED_MODELS = {
    "minimax": "MiniMaxLightningAttention",
    "qwen3_next": "Qwen3NextGatedDeltaNet",
    "qwen3_5": "Qwen3_5GatedDeltaNet",
    "qwen3_5_moe": "Qwen3_5MoeGatedDeltaNet",
    "olmo_hybrid": "OlmoHybridGatedDeltaNet",
    "mamba2": "Mamba2Mixer",
    "bamba": "BambaMixer",
    "nemotron_h": "NemotronHMamba2Mixer",
    "granitemoehybrid": "GraniteMoeHybridMambaLayer",
    "zamba2": "Zamba2MambaMixer",
    "falcon_h1": "FalconH1Mixer",
}
_DELTA_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid")
_MAMBA2_FAMILIES = ("mamba2", "bamba", "nemotron_h", "granitemoehybrid", "zamba2", "falcon_h1")


def patch(model: torch.nn.Module, sp_group=None, *, sp_strategy: str = "ring",
          allow_untested_version: bool = False) -> torch.nn.Module:
    """Run the linear-attention layers of a supported transformers model through lasp (in place; returns
    the model). Dispatches on the layers the model holds (``SUPPORTED_MODELS``): MiniMax to
    :func:`patch_minimax`, the Gated DeltaNet families (Qwen3-Next, Qwen3.5 / Qwen3.5-MoE, OLMo hybrid) to
    :func:`lasp.integrations.hf_delta.patch_gated_deltanet`, the Mamba-2 families to
    :func:`lasp.integrations.hf_mamba2.patch_mamba2`; all take these arguments. Raises ValueError
    naming the supported families when the model holds none of their layers."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(_err(f"patch: model must be a torch.nn.Module, got {type(model).__name__}"))
    names = {type(m).__name__ for m in model.modules()}
    if SUPPORTED_MODELS["minimax"] in names:
        return patch_minimax(model, sp_group, sp_strategy=sp_strategy, allow_untested_version=allow_untested_version)
    if any(SUPPORTED_MODELS[f] in names for f in _DELTA_FAMILIES):
        from .hf_delta import patch_gated_deltanet

        return patch_gated_deltanet(model, sp_group, sp_strategy=sp_strategy,
                                    allow_untested_version=allow_untested_version)
    if any(SUPPORTED_MODELS[f] in names for f in _MAMBA2_FAMILIES):
        from .hf_mamba2 import patch_mamba2

        return patch_mamba2(model, sp_group, sp_strategy=sp_strategy, allow_untested_version=allow_untested_version)
    raise ValueError(
        _err(f"patch: {type(model).__name__} holds no layer lasp can swap; supported families (layer class): "
             + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items()))
    )


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` (returns the model)."""
    state = getattr(model, _PATCH_ATTR, None)
    if state is None:
        raise ValueError(_err("model is not patched (patch was not called on it)"))
    return _unpatch(model, state)
