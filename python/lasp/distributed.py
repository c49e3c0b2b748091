"""Data parallel x sequence parallel: the 2-D process layout and the sequence split.

A run over ``world = dp * sp`` ranks is a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh`
with dims ``("dp", "sp")``: ranks ``[d * sp, (d + 1) * sp)`` (consecutive ranks, so the LASP state
traffic stays between the closest GPUs) form the sequence-parallel group of data-parallel replica
``d``. Each replica gets its own batch; inside a replica every sequence is cut into ``sp``
contiguous pieces, sp rank ``r`` holding piece ``r``::

    mesh = lasp.distributed.init_mesh(sp=4)                 # after init_process_group; dp = world // 4
    sp, dp = lasp.distributed.sp_group(mesh), lasp.distributed.dp_group(mesh)
    ids = lasp.distributed.split_sequence(batch_ids, sp)    # (B, N) -> (B, this rank's piece)
    loss = model(ids, labels, sp_group=sp).loss             # lasp.models: the ring runs inside
    loss.backward()
    lasp.distributed.allreduce_grads(model.parameters(), sp)   # sum over the pieces of each sequence
    # ... then average over dp as usual: DDP(model, process_group=dp) or fully_shard(model, mesh=mesh["dp"])

Sequence dimension: every function takes ``dim``, default 1, the token dim of the ``(B, N, ...)``
tensors of the models (``input_ids`` (B, N), hidden states (B, N, C)) and of ``lasp_attention``'s
``layout="bnhd"``. For the default ``layout="bhnd"`` of ``lasp_attention`` (q of shape (B, H, N, D))
pass ``dim=2``.

Packed documents (one row of B = 1 holding several documents, ``cu_seqlens`` = ``[0, ..., N]`` their
global offsets, the same on every rank): :func:`split_packed` gives this rank's piece and the position
of each of its tokens inside its document (position ids that restart at every document, as
transformers' ``DataCollatorWithFlattening`` makes them); documents may span any number of ranks.

Strategy: :func:`choose_strategy` gives what ``strategy="auto"`` of ``lasp_attention`` and
``gated_delta_attention`` runs on a group, "ring" or "allgather", with the predicted times behind the choice
(``lasp.scaling``'s cost model, from the group's size and node layout; see docs/design.md).

Pieces are balanced: with ``n`` tokens over ``W`` ranks, the first ``n % W`` ranks hold one more
token (as ``torch.tensor_split``); with ``n < W`` the last ranks hold empty pieces, which
``lasp_attention`` accepts (N = 0 passes the state through).
"""
from __future__ import annotations

import os
import socket
import sys
import weakref
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import scaling

__all__ = [
    "SEQ_DIM",
    "init_mesh",
    "sp_group",
    "dp_group",
    "shard_bounds",
    "split_sequence",
    "gather_sequence",
    "allreduce_grads",
    "check_cu_seqlens",
    "document_position_ids",
    "document_reset_gates",
    "split_packed",
    "choose_strategy",
]

SEQ_DIM = 1  # token dim of (B, N, ...) tensors; lasp_attention's "bhnd" layout has it at 2


def _check_initialized(fn: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"lasp.distributed.{fn}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (torchrun sets the environment it reads)"
        )


def _check_int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"lasp.distributed.{fn}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"lasp.distributed.{fn}: {name} must be >= {minimum}, got {value}")
    return value


def _default_device_type() -> str:
    backend = str(dist.get_backend()).lower()
    return "cuda" if "nccl" in backend else "cpu"


def init_mesh(sp: int, dp: Optional[int] = None, device_type: Optional[str] = None):
    """The 2-D DeviceMesh ``(dp, sp)`` with dims named ``("dp", "sp")`` over all ranks.

    Args:
        sp: sequence-parallel size: the ranks that share each sequence (must divide the world size).
        dp: data-parallel size; default ``world // sp``. ``dp * sp`` must equal the world size.
        device_type: the mesh's device type; default ``"cuda"`` when the default process group's
            backend is NCCL, else ``"cpu"`` (gloo).
    Returns:
        ``init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))``: global rank
        ``d * sp + r`` is sp rank ``r`` of dp replica ``d`` (consecutive ranks share a sequence).
        Every rank must call this (it creates the dp and sp process groups).
    Raises:
        RuntimeError if torch.distributed is not initialized; ValueError / TypeError naming
        ``sp`` or ``dp`` when they do not factor the world size.
    """
    _check_initialized("init_mesh")
    world = dist.get_world_size()
    _check_int("init_mesh", "sp", sp, 1)
    if world % sp != 0:
        raise ValueError(f"lasp.distributed.init_mesh: sp ({sp}) must divide the world size ({world})")
    if dp is None:
        dp = world // sp
    _check_int("init_mesh", "dp", dp, 1)
    if dp * sp != world:
        raise ValueError(
            f"lasp.distributed.init_mesh: dp * sp must equal the world size ({world}), "
            f"got dp ({dp}) * sp ({sp}) = {dp * sp}"
        )
    if device_type is None:
        device_type = _default_device_type()
    elif not isinstance(device_type, str):
        raise TypeError(f"lasp.distributed.init_mesh: device_type must be a str or None, got {type(device_type).__name__}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))


def _mesh_group(mesh, name: str, fn: str):
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"lasp.distributed.{fn}: mesh must be a torch DeviceMesh (see lasp.distributed.init_mesh), "
            f"got {type(mesh).__name__}"
        )
    names = tuple(mesh.mesh_dim_names or ())
    if name not in names:
        raise ValueError(f"lasp.distributed.{fn}: mesh has no dimension named {name!r} (its dims: {names})")
    return mesh.get_group(name)


def sp_group(mesh):
    """The sequence-parallel process group of this rank: the mesh's ``"sp"`` dim (pass it to
    ``lasp_attention(group=...)``, ``LinearAttention`` / ``LaspForCausalLM``'s ``sp_group``)."""
    return _mesh_group(mesh, "sp", "sp_group")


def dp_group(mesh):
    """The data-parallel process group of this rank: the mesh's ``"dp"`` dim (DDP's
    ``process_group``; for FSDP2 pass ``mesh["dp"]`` to ``fully_shard``)."""
    return _mesh_group(mesh, "dp", "dp_group")


def shard_bounds(n: int, world: int, rank: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s piece when ``n`` tokens are split over ``world`` ranks.

    Balanced and contiguous, as ``torch.tensor_split(x, world)``: the first ``n % world`` ranks get
    ``n // world + 1`` tokens, the others ``n // world`` (possibly 0: ``n < world`` is allowed).
    """
    _check_int("shard_bounds", "n", n, 0)
    _check_int("shard_bounds", "world", world, 1)
    _check_int("shard_bounds", "rank", rank, 0)
    if rank >= world:
        raise ValueError(f"lasp.distributed.shard_bounds: rank must be < world ({world}), got {rank}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _group_size_rank(group, fn: str) -> Tuple[int, int]:
    _check_initialized(fn)
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"lasp.distributed.{fn}: this process is not a member of group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"lasp.distributed.{fn}: group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _norm_dim(x: torch.Tensor, dim, fn: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lasp.distributed.{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"lasp.distributed.{fn}: dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"lasp.distributed.{fn}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}"
        )
    return dim % x.dim()


def split_sequence(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """This rank's contiguous piece of ``x`` along ``dim`` (see :func:`shard_bounds`), as a
    contiguous copy (the full tensor can be freed). Differentiable. ``group=None``: ``x`` unchanged.

    ``dim``: the token dim; 1 for ``(B, N, ...)`` tensors, 2 for ``lasp_attention``'s ``"bhnd"``.
    """
    if group is None:
        return x
    W, r = _group_size_rank(group, "split_sequence")
    d = _norm_dim(x, dim, "split_sequence")
    start, stop = shard_bounds(x.shape[d], W, r)
    return x.narrow(d, start, stop - start).clone(memory_format=torch.contiguous_format)


# dtypes the shape exchange can name (so ranks that disagree on dtype get a clear error)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_MAX_DIMS = 12


def _exchange_shapes(x: torch.Tensor, d: int, group, W: int) -> list:
    """All-gather (dtype, ndim, dim, shape) of every rank's piece; every rank raises the same
    ValueError when anything but the sequence length differs. Returns the lengths in rank order."""
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"lasp.distributed.gather_sequence: x may have at most {_MAX_DIMS} dims, got {x.dim()}")
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    desc = [code, x.dim(), d] + list(x.shape) + [0] * (_MAX_DIMS - x.dim())
    mine = torch.tensor(desc, dtype=torch.int64, device=x.device)
    allv = torch.empty((W * len(desc),), dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(allv, mine, group=group)
    rows = allv.view(W, len(desc)).tolist()
    ref = rows[0]
    for i, row in enumerate(rows):
        same = row[:3] == ref[:3] and all(
            a == b for j, (a, b) in enumerate(zip(row[3:], ref[3:])) if j != d
        )
        if not same:
            def fmt(rw):
                shape = tuple(rw[3:3 + rw[1]])
                dt = _DTYPES[rw[0]] if 0 <= rw[0] < len(_DTYPES) else "other dtype"
                return f"shape {shape} {dt} dim {rw[2]}"

            raise ValueError(
                "lasp.distributed.gather_sequence: the ranks' pieces (x_local) must agree on dtype, number of dims, "
                f"dim and every size but the sequence length (group rank 0: {fmt(ref)}; group rank {i}: {fmt(row)})"
            )
    return [row[3 + d] for row in rows]


def _all_gather_uneven(x: torch.Tensor, group, d: int, sizes: Sequence[int]) -> torch.Tensor:
    W = len(sizes)
    m = max(sizes)
    xs = x.movedim(d, 0)
    rest = tuple(xs.shape[1:])
    full_shape = list(x.shape)
    full_shape[d] = sum(sizes)
    if m == 0:
        return x.new_empty(full_shape)
    if xs.shape[0] == m:
        buf = xs.contiguous()
    else:  # pad to the longest piece: one equal-size all-gather serves every backend
        buf = xs.new_zeros((m,) + rest)
        buf[: xs.shape[0]].copy_(xs)
    out = xs.new_empty((W * m,) + rest)
    dist.all_gather_into_tensor(out, buf, group=group)
    if any(s != m for s in sizes):
        out = torch.cat([out[i * m: i * m + s] for i, s in enumerate(sizes)], 0)
    return out.movedim(0, d).contiguous()


def _reduce_scatter_uneven(g: torch.Tensor, group, d: int, sizes: Sequence[int], rank: int) -> torch.Tensor:
    W = len(sizes)
    m = max(sizes)
    gs = g.movedim(d, 0)
    rest = tuple(gs.shape[1:])
    if m == 0:
        return g.narrow(d, 0, 0).contiguous()
    if all(s == m for s in sizes):
        buf = gs.contiguous()
    else:
        buf = gs.new_zeros((W * m,) + rest)
        off = 0
        for i, s in enumerate(sizes):
            buf[i * m: i * m + s].copy_(gs[off: off + s])
            off += s
    out = gs.new_empty((m,) + rest)
    try:
        dist.reduce_scatter_tensor(out, buf, group=group)
    except RuntimeError as e:  # backends without reduce-scatter: all-reduce and keep this rank's slice
        if "not support" not in str(e).lower():
            raise
        dist.all_reduce(buf, group=group)
        out = buf[rank * m: (rank + 1) * m]
    return out[: sizes[rank]].movedim(0, d).contiguous()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, d, sizes, rank):
        ctx.group, ctx.d, ctx.sizes, ctx.rank = group, d, sizes, rank
        return _all_gather_uneven(x, group, d, sizes)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_uneven(g, ctx.group, ctx.d, ctx.sizes, ctx.rank), None, None, None, None


def gather_sequence(x_local: torch.Tensor, group, dim: int = SEQ_DIM,
                    sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The whole sequence from every rank's piece: the concatenation along ``dim`` of the group's
    pieces in group-rank order (the inverse of :func:`split_sequence`). Pieces may differ in length
    (also 0) but must agree on every other dim and on dtype. Differentiable: the backward is the
    adjoint, i.e. each rank receives its slice of the sum over ranks of the output gradients
    (a reduce-scatter), which is the gradient of the sum of the ranks' losses (the convention of
    ``lasp.models``, where each rank's loss covers its own tokens).

    Args:
        x_local: this rank's piece.
        group: the sequence-parallel process group; None returns ``x_local`` unchanged.
        dim: the token dim; 1 for ``(B, N, ...)`` tensors, 2 for ``lasp_attention``'s ``"bhnd"``.
        sizes: every rank's piece length in group-rank order, if known (e.g. from
            :func:`shard_bounds`); None exchanges them with one small all-gather, which also checks
            that the other dims agree (every rank raises the same ValueError) but costs a host
            synchronisation on CUDA.
    Works on any backend with all-gather and reduce-scatter or all-reduce (gloo, NCCL).
    """
    if group is None:
        return x_local
    W, r = _group_size_rank(group, "gather_sequence")
    d = _norm_dim(x_local, dim, "gather_sequence")
    if sizes is None:
        sizes = _exchange_shapes(x_local, d, group, W) if W > 1 else [x_local.shape[d]]
    else:
        sizes = [int(s) for s in sizes]
        if len(sizes) != W:
            raise ValueError(
                f"lasp.distributed.gather_sequence: sizes must have one entry per group rank ({W}), got {len(sizes)}"
            )
        if any(s < 0 for s in sizes):
            raise ValueError(f"lasp.distributed.gather_sequence: sizes must be >= 0, got {sizes}")
        if sizes[r] != x_local.shape[d]:
            raise ValueError(
                f"lasp.distributed.gather_sequence: sizes[{r}] ({sizes[r]}) is not this rank's piece length "
                f"(x_local.shape[{d}] = {x_local.shape[d]})"
            )
    if W == 1:
        return x_local
    return _GatherSequence.apply(x_local, group, d, tuple(sizes), r)


def allreduce_grads(parameters: Iterable[torch.Tensor], group) -> None:
    """Sum the gradients of ``parameters`` over ``group`` in place, one flattened all-reduce per
    dtype. For parameters replicated over the sp group: each rank's loss covers its own tokens, so
    the sum over sp ranks is the whole sequence's gradient. Call it after ``backward`` and before
    clipping / the optimizer step; DDP or FSDP2 on the dp group average over dp as usual.

    Works on plain tensors (no wrapper or DDP) and on FSDP2's DTensor gradients (their local shards:
    every sp rank of a dp shard holds the same shard, so summing the shards over sp is exact).
    ``group=None`` or a group of one: nothing to do.
    """
    if group is None:
        return
    W, _ = _group_size_rank(group, "allreduce_grads")
    if W == 1:
        return
    by_key = {}
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad
        local = g.to_local() if hasattr(g, "to_local") else g
        by_key.setdefault((local.dtype, local.device), []).append(local)
    for tensors in by_key.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        off = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n


# ----------------------------------------------------------------------------------------------
# Packed documents


def check_cu_seqlens(cu_seqlens, total: Optional[int], fn: str = "check_cu_seqlens") -> torch.Tensor:
    """Checks document offsets ``cu_seqlens`` of a packed row of ``total`` tokens and returns them as a CPU
    int64 tensor. They must be a 1-D int32 or int64 tensor ``[0, ..., total]``, strictly increasing (every
    document has at least one token). Each violation raises a ValueError / TypeError naming ``cu_seqlens``.
    ``total`` None: any last offset. ``fn``: the function named in the errors (``lasp.distributed.fn``, or
    ``fn`` itself where it has a dot)."""
    return _check_cu_seqlens(cu_seqlens, total, fn if "." in fn else f"lasp.distributed.{fn}")


def _check_cu_seqlens(cu_seqlens, total: Optional[int], where: str) -> torch.Tensor:
    """check_cu_seqlens with the errors' prefix ``where`` as given (the ops name themselves)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{where}: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{where}: cu_seqlens must be 1-D with at least 2 offsets [0, ..., N], got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"{where}: cu_seqlens must start at 0, got {int(cu[0])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps <= 0).any()):
        i = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(
            f"{where}: cu_seqlens must be strictly increasing (no empty documents), got cu_seqlens[{i}] = "
            f"{int(cu[i])} and cu_seqlens[{i + 1}] = {int(cu[i + 1])}"
        )
    if total is not None and int(cu[-1]) != total:
        raise ValueError(
            f"{where}: the last offset of cu_seqlens ({int(cu[-1])}) must equal the packed length ({total})"
        )
    return cu


def document_position_ids(cu_seqlens, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Position of each token ``start .. stop-1`` of a packed row inside its document (0 at every document
    start), as a 1-D int64 CPU tensor. ``stop`` defaults to the packed length ``cu_seqlens[-1]``."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"lasp.distributed.document_position_ids: cu_seqlens must be a torch.Tensor, got "
                        f"{type(cu_seqlens).__name__}")
    total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
    cu = check_cu_seqlens(cu_seqlens, total, "document_position_ids")
    stop = total if stop is None else stop
    _check_int("document_position_ids", "start", start, 0)
    _check_int("document_position_ids", "stop", stop, start)
    if stop > total:
        raise ValueError(f"lasp.distributed.document_position_ids: stop ({stop}) must be <= the packed length ({total})")
    return _positions(cu, start, stop)


def document_reset_gates(cu_seqlens, num_heads: int, start: int = 0, stop: Optional[int] = None,
                         layout: str = "bhnd") -> torch.Tensor:
    """Log gates that cut a packed row's state at every document start: ``-inf`` at the first token of every
    document but the first, 0 elsewhere, for tokens ``start .. stop-1`` (a rank's piece; ``stop`` defaults to
    the packed length). Pass them as ``lasp_attention(..., g=...)`` (add them to a model's own gates), and
    each document attends only to itself, across ranks too; ``initial_state`` then feeds the first document
    only, and the final state is the last document's. Returns a float32 CPU tensor (1, num_heads, n) for
    layout "bhnd" or (1, n, num_heads) for "bnhd"."""
    fn = "lasp.distributed.document_reset_gates"
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{fn}: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
    cu = check_cu_seqlens(cu_seqlens, total, "document_reset_gates")
    stop = total if stop is None else stop
    _check_int("document_reset_gates", "num_heads", num_heads, 1)
    _check_int("document_reset_gates", "start", start, 0)
    _check_int("document_reset_gates", "stop", stop, start)
    if stop > total:
        raise ValueError(f"{fn}: stop ({stop}) must be <= the packed length ({total})")
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"{fn}: layout must be 'bhnd' or 'bnhd', got {layout!r}")
    g = torch.zeros(stop - start, dtype=torch.float32)
    g[_piece_starts(cu[1:-1], start, stop)] = float("-inf")
    g = g.view(1, 1, -1).expand(1, num_heads, -1)
    return (g.transpose(1, 2) if layout == "bnhd" else g).contiguous()


def _positions(cu: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """document_position_ids on offsets check_cu_seqlens has passed."""
    t = torch.arange(start, stop, dtype=torch.int64)
    doc = torch.searchsorted(cu, t, right=True) - 1
    return t - cu[doc]


def _piece_starts(starts: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The global positions ``starts`` that fall in the piece [start, stop), as positions in the piece."""
    return starts[(starts >= start) & (starts < stop)] - start


def _document_resets(cu: torch.Tensor, start: int, stop: int, device) -> torch.Tensor:
    """(1, 1, stop - start) bool on ``device``: True at every document start in the piece [start, stop)."""
    reset = torch.zeros(stop - start, dtype=torch.bool)
    reset[_piece_starts(cu[:-1], start, stop)] = True
    return reset.to(device).view(1, 1, -1)


class _Offsets:
    """The checked offsets of one ``cu_seqlens`` tensor (CPU int64), their signature, and the start masks of
    the pieces asked for so far."""

    __slots__ = ("version", "cu", "signature", "resets")

    def __init__(self, version: int, cu: torch.Tensor):
        self.version, self.cu, self.signature, self.resets = version, cu, _cu_signature(cu), {}

    def starts(self, start: int, stop: int, device) -> torch.Tensor:
        """_document_resets of the piece [start, stop) on ``device``, made once (treat it as read-only)."""
        key = (start, stop, str(device))
        m = self.resets.get(key)
        if m is None:
            if len(self.resets) >= 16:
                self.resets.clear()
            m = self.resets[key] = _document_resets(self.cu, start, stop, device)
        return m


# cu_seqlens tensor -> _Offsets. A model calls its attention layers with the same offsets tensor, and checking
# it reads it to the host (a device sync) each time: the result is kept while the tensor lives, and used
# again only while its version counter (which every in-place change through torch advances) is unchanged.
_OFFSETS = None


def _checked_offsets(cu_seqlens, where: str) -> _Offsets:
    """The checks of check_cu_seqlens(cu_seqlens, None) once per tensor and version, their errors starting
    with ``where`` (the op's own name: "lasp_attention", "lasp.gated_delta_attention")."""
    global _OFFSETS
    version = None
    if isinstance(cu_seqlens, torch.Tensor) and not torch.compiler.is_compiling():
        try:
            version = cu_seqlens._version
        except RuntimeError:  # an inference tensor has no version counter: checked at every call
            version = None
    if version is not None:
        if _OFFSETS is None:
            from torch.utils.weak import WeakIdKeyDictionary

            _OFFSETS = WeakIdKeyDictionary()
        hit = _OFFSETS.get(cu_seqlens)
        if hit is not None and hit.version == version:
            return hit
    entry = _Offsets(-1 if version is None else version, _check_cu_seqlens(cu_seqlens, None, where))
    if version is not None:
        _OFFSETS[cu_seqlens] = entry
    return entry


def _cu_signature(cu: Optional[torch.Tensor]) -> list:
    """Three integers that differ when two ranks' checked offsets differ ([0, 0, 0] for None)."""
    if cu is None:
        return [0, 0, 0]
    w = torch.arange(1, cu.numel() + 1, dtype=torch.int64)
    return [cu.numel(), int(cu.sum()), int((cu * w).sum() % (1 << 61))]


def _gather_rows(group, row: Sequence[int]) -> Tuple[list, int]:
    """Every group rank's ``row`` of integers (one small all-gather; on the CPU for Gloo, on this process's
    GPU for NCCL) and this rank's index. group None: ``[row]``, 0."""
    if group is None:
        return [list(row)], 0
    W, rank = _group_size_rank(group, "gather")
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    allv = torch.empty(len(row) * W, dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(allv, torch.tensor(list(row), dtype=torch.int64, device=dev), group=group)
    return allv.view(W, len(row)).tolist(), rank


def _raise_if_invalid(rows: list, col: int, local_err: Optional[BaseException], what: str) -> None:
    """Every rank raises when row[col] is 0 on some rank (its rank-local checks failed): that rank its own
    error, the others one that names it."""
    bad = [i for i, r in enumerate(rows) if r[col] == 0]
    if not bad:
        return
    if local_err is not None:
        raise type(local_err)(f"{local_err}" + (f" (group ranks {bad})" if len(rows) > 1 else ""))
    raise ValueError(f"{what} is not valid on group ranks {bad} (see their errors)")


def _check_same_offsets(cu: torch.Tensor, group) -> None:
    """Every rank of the group raises the same error when the ranks' cu_seqlens differ."""
    W, _ = _group_size_rank(group, "split_packed")
    if W == 1:
        return
    rows, _ = _gather_rows(group, _cu_signature(cu))
    differ = [i for i, row in enumerate(rows) if row != rows[0]]
    if differ:
        raise ValueError(
            "lasp.distributed.split_packed: cu_seqlens must be the same on every rank of the group (the global "
            f"document offsets); group ranks {differ} differ from group rank 0"
        )


def split_packed(x: torch.Tensor, cu_seqlens, group, dim: int = SEQ_DIM) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous piece of a packed row and the position ids of its tokens inside their documents.

    Args:
        x: the packed row, batch size 1: ``input_ids`` (1, N), hidden states (1, N, C), ... (``dim``: the
            token dim, default 1).
        cu_seqlens: the global document offsets ``[0, ..., N]`` (int32 / int64), the same on every rank
            (checked with one small all-gather; a difference raises on every rank). Pass the same tensor to
            ``lasp_attention``: it stays global.
        group: the sequence-parallel group; None: the whole row (one rank).
    Returns:
        ``(x_local, position_ids)``: the piece of :func:`split_sequence` (balanced, contiguous; documents may
        span any number of ranks, pieces may be empty) and a (1, n_local) int64 tensor on ``x``'s device with
        each token's position inside its document.
    Raises:
        ValueError naming ``x`` when the batch size is not 1, and the errors of :func:`check_cu_seqlens`.
    """
    d = _norm_dim(x, dim, "split_packed")
    if d == 0 or x.shape[0] != 1:
        raise ValueError(
            f"lasp.distributed.split_packed: x must be one packed row (batch size 1, tokens along dim {d} != 0), "
            f"got shape {tuple(x.shape)}"
        )
    total = x.shape[d]
    cu = check_cu_seqlens(cu_seqlens, total, "split_packed")
    if group is None:
        W, r = 1, 0
    else:
        W, r = _group_size_rank(group, "split_packed")
        _check_same_offsets(cu, group)
    start, stop = shard_bounds(total, W, r)
    piece = x.narrow(d, start, stop - start).clone(memory_format=torch.contiguous_format)
    return piece, _positions(cu, start, stop).unsqueeze(0).to(x.device)


# ----------------------------------------------------------------------------------------------
# strategy="auto"

STRATEGY_CHOICES = ("ring", "allgather", "scan", "auto")
_OPS = ("lasp_attention", "gated_delta_attention")
_HOSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # group -> host of each group rank


def _end_torchrun_process(code: Optional[int] = 0) -> None:
    """The end of our example and benchmark scripts: under torchrun (env RANK set), once the work is done and
    the process group destroyed, flush the standard streams and leave with os._exit(code), skipping the
    interpreter's teardown, in which the process group's threads have (rarely) aborted a finished process
    ("terminate called without an active exception"); otherwise sys.exit(code)."""
    code = 0 if code is None else int(code)
    if "RANK" not in os.environ:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _node_size_env() -> Optional[int]:
    raw = os.environ.get("LASP_NODE_SIZE", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"lasp: env LASP_NODE_SIZE must be a positive integer (ranks per node), got {raw!r}")
    return int(raw)


def _group_hosts(group) -> tuple:
    """The host of each group rank, in group rank order.

    Found once per group, with one all_gather_object of the host names over the group (a collective: the
    first call on a group must be made by all its ranks, as every lasp call on it is), then cached for the
    group's lifetime. With env LASP_NODE_SIZE=k the node of a rank is its global rank // k instead (nodes
    of k consecutive ranks, no collective): a multi-node layout on one host, for tests.
    """
    W = dist.get_world_size(group)
    k = _node_size_env()
    if k is not None:
        return tuple(dist.get_global_rank(group, i) // k for i in range(W))
    hosts = _HOSTS.get(group)
    if hosts is None:
        names = [None] * W
        dist.all_gather_object(names, socket.gethostname(), group=group)
        hosts = _HOSTS[group] = tuple(names)
    return hosts


def _ring_transport(group, device_type: str, float32_states: bool, gates: bool, one_node: bool) -> Tuple[str, bool]:
    """How lasp_attention's ring would pass the states on ``group`` ("nccl": the process group's send/recv,
    "peer": peer memory) and whether the ring can run at all. The exchange's own rule (use_peer in
    csrc/exchange.cpp), from values that every rank shares; with the "auto" transport it assumes that
    ranks on one host can map each other's memory (where they cannot, the ring falls back to the process
    group on every rank)."""
    from ._ops import get_ring_transport

    setting = get_ring_transport()
    # gated calls take the peer ring only when it is asked for ("auto" keeps them on the process group)
    if (gates and setting == "auto") or setting == "nccl" or device_type != "cuda" or not float32_states:
        return "nccl", True
    if setting == "auto" and dist.get_backend(group) != "nccl":
        return "nccl", True
    if not one_node:
        return "nccl", setting == "auto"  # an explicit "peer" across nodes raises
    return "peer", True


def choose_strategy(group, *, batch: int, heads: int, head_dim: int, value_dim: Optional[int] = None,
                    dtype: torch.dtype = torch.bfloat16, device_type: Optional[str] = None, gates: bool = False,
                    op: str = "lasp_attention") -> "scaling.Choice":
    """The strategy that ``strategy="auto"`` runs for a call on ``group``, and the predicted times behind it.

    The choice depends only on what every rank of the group shares, never on a piece's length, so all ranks
    pick the same: the group's size and node layout (the host of each rank: one all_gather_object of the
    host names the first time a group is seen, then cached; env LASP_NODE_SIZE=k makes nodes of k
    consecutive global ranks instead), the state's size (batch x heads x head_dim x value_dim, float32, or
    float64 for float64 inputs), how the ring would pass it (:func:`lasp.set_ring_transport`, the device
    type, the backend, gates) and the op. Among "ring" and "allgather" it takes the one whose exchange
    ``lasp.scaling`` predicts to add the least time to a forward+backward (ties: "ring"), never one that
    would raise (the peer transport set explicitly does not span nodes). The model is
    calibrated on GPUs; CPU (Gloo) groups follow the same rule.

    Args:
        group: the sequence-parallel process group; None (or one rank): "ring", nothing is exchanged. The
            first call on a group is a collective over it.
        batch, heads, head_dim, value_dim: B, the output heads H = max(Hq, Hv), D and E (default D).
        dtype: the inputs' dtype. device_type: "cuda" or "cpu" (default: "cuda" for NCCL groups).
        gates: whether the call has per-token gates (``g`` or ``cu_seqlens``), which the ``"auto"`` transport
            keeps on the process group (the peer ring takes them when ``"peer"`` is set).
        op: "lasp_attention" or "gated_delta_attention" (whose ring is the process group's send/recv and
            whose all-gather carries each piece's D x (D + 2E) map per head).
    Returns:
        a :class:`lasp.scaling.Choice`: ``.strategy``, ``.split_ms`` (per strategy, the predicted ms its
        exchange adds to one forward+backward), ``.topology``, ``.transport`` and the sizes it used;
        ``str()`` of it says all of that in one line.
    """
    fn = "choose_strategy"
    for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        _check_int(fn, name, value, 1)
    value_dim = head_dim if value_dim is None else _check_int(fn, "value_dim", value_dim, 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"lasp.distributed.{fn}: dtype must be a floating torch.dtype, got {dtype!r}")
    if op not in _OPS:
        raise ValueError(f"lasp.distributed.{fn}: op must be one of {_OPS}, got {op!r}")
    W = 1 if group is None else _group_size_rank(group, fn)[0]
    if device_type is None:
        device_type = "cuda" if W > 1 and dist.get_backend(group) == "nccl" else "cpu"
    acc_bytes = 8 if dtype == torch.float64 else 4
    state_bytes = batch * heads * head_dim * value_dim * acc_bytes
    topo = scaling.Topology.from_hosts(_group_hosts(group)) if W > 1 else scaling.Topology(1)
    if op == "gated_delta_attention":
        return scaling.choose(topo, state_bytes, gather_bytes=batch * heads * head_dim * (head_dim + 2 * value_dim)
                              * acc_bytes)
    transport, ring_runs = ("nccl", True)
    if W > 1:
        transport, ring_runs = _ring_transport(group, device_type, acc_bytes == 4, bool(gates), topo.nodes == 1)
    return scaling.choose(topo, state_bytes, transport=transport,
                          candidates=scaling.AUTO if ring_runs else ("allgather",))


def _scan_layout(group) -> str:
    """The name of the scan on ``group`` that the ops run: "scan:<m>" where the group's ranks fill nodes of
    m > 1 consecutive ranks (the last node may hold fewer) on two or more nodes, which they then scan within
    nodes first (csrc/exchange.h); "scan" (one level) otherwise. The layout as :func:`choose_strategy` reads
    it (host names gathered once per group; env LASP_NODE_SIZE)."""
    blocks: list = []
    for h in _group_hosts(group):
        if blocks and blocks[-1][0] == h:
            blocks[-1][1] += 1
        else:
            blocks.append([h, 1])
    m = blocks[0][1]
    filled = (len({b[0] for b in blocks}) == len(blocks) and all(b[1] == m for b in blocks[:-1])
              and blocks[-1][1] <= m)
    return f"scan:{m}" if len(blocks) > 1 and m > 1 and filled else "scan"


def _resolve_strategy(fn: str, strategy, group, q: torch.Tensor, v: torch.Tensor, *, gates: bool, op: str) -> str:
    """The strategy a call runs: an explicit one as given ("scan" with the group's node layout,
    :func:`_scan_layout`), "auto" by :func:`choose_strategy` (``q``, ``v`` in the "bhnd" view).
    Raises a ValueError naming the choices for anything else."""
    if not isinstance(strategy, str) or strategy not in STRATEGY_CHOICES:
        raise ValueError(f"{fn}: strategy must be 'ring', 'allgather', 'scan' or 'auto', got {strategy!r}")
    if strategy == "scan" and group is not None:
        from ._ops import _group_name

        return _scan_layout(group) if _group_name(group) is not None else strategy
    if strategy != "auto":
        return strategy
    if group is None:
        return "ring"  # the whole sequence is here: nothing is exchanged
    from ._ops import _group_name

    if (_group_name(group) is None or q.dim() != 4 or v.dim() != 4 or not q.dtype.is_floating_point
            or min(q.shape[0], q.shape[1], q.shape[3], v.shape[1], v.shape[3]) == 0):
        return "ring"  # one rank, an empty state; or a malformed call, which the op rejects with its own error
    return choose_strategy(group, batch=int(q.shape[0]), heads=max(int(q.shape[1]), int(v.shape[1])),
                           head_dim=int(q.shape[3]), value_dim=int(v.shape[3]), dtype=q.dtype,
                           device_type=q.device.type, gates=gates, op=op).strategy
