"""Loads the compiled library (which registers torch.ops.lasp.*) and wraps the op for Python users."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

_PKG = Path(__file__).resolve().parent


def _check_torch_version() -> None:
    """The library only works under the torch it was compiled against (C++ ABI): say so before loading it."""
    try:
        from ._build_info import TORCH_VERSION as built
    except ImportError:
        return  # not built by setup.py (e.g. CMake alone): nothing recorded to check against
    if built != torch.__version__:
        raise ImportError(
            f"lasp: the compiled library was built against torch {built}, but this environment runs torch "
            f"{torch.__version__}; rebuild lasp against this torch: `pip install -e . --no-build-isolation` from "
            "the repository root (or `pip install . --no-build-isolation --force-reinstall --no-deps`)"
        )


def _load() -> None:
    found = sorted(_PKG.glob("liblasp*.so"))
    path = os.environ.get("LASP_LIBRARY") or (str(found[0]) if found else str(_PKG / "liblasp.so"))
    if not os.path.exists(path):
        raise ImportError(
            f"lasp: compiled library not found at {path}; build it with `pip install -e . --no-build-isolation` "
            "from the repository root"
        )
    if not os.environ.get("LASP_LIBRARY"):  # a library given by path was not built by setup.py
        _check_torch_version()
    torch.ops.load_library(path)


_load()


def _group_name(group) -> Optional[str]:
    """The registered name of a sequence-parallel process group (None: no communication)."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "lasp_attention: group was given but torch.distributed is not initialized; "
            "call torch.distributed.init_process_group first (or pass group=None)"
        )
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("lasp_attention: this process is not a member of group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"lasp_attention: group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if group.size() == 1:
        return None
    return group.group_name


def lasp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    group=None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    layout: str = "bhnd",
    strategy: str = "ring",
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Causal linear attention with per-head decay and per-token gates, optionally sequence-parallel over `group`.

    o[t] = scale * sum_{s<=t} exp(sum_{s<i<=t} g[i] - decay[h] (t-s)) (q[t].k[s]) v[s]  (+ the initial state's term)

    that is, S[t] = exp(g[t] - decay[h]) S[t-1] + k[t]^T v[t] and o[t] = scale q[t] S[t].

    Args:
        q: (B, Hq, N, D) for layout "bhnd", (B, N, Hq, D) for layout "bnhd".
        k: (B, Hk, N, D) or (B, N, Hk, D).
        v: (B, Hv, N, E) or (B, N, Hv, E). The output has H = max(Hq, Hv) heads; Hq, Hk and Hv each
            divide H, and output head h reads q head h // (H / Hq), k head h // (H / Hk) and v head
            h // (H / Hv): MHA, GQA and MQA (Hq = H, Hk = Hv), and GVA (Hq = Hk < Hv, as Mamba-2's
            shared B and C). States, decay and g are per output head. On CUDA the tensor-core kernels
            take MHA, GQA and MQA; other maps run on the generic kernels.
        decay: None (no decay) or a float tensor (H,) of rates >= 0 (see alibi_slopes); a constant.
        g: None or per-token log gates (B, H, N) for layout "bhnd", (B, N, H) for "bnhd", values <= 0
            (-inf resets the state), any float dtype, computed in float32 (float64 for float64 inputs);
            differentiable, also across ranks. Under a group each rank passes the gates of its piece.
        scale: defaults to 1/sqrt(D).
        group: a torch.distributed ProcessGroup over which the sequence is split (group rank i holds
            the i-th contiguous piece; pieces may differ in length). None: the whole sequence is here.
        initial_state: (B, H, D, E) float32 (float64 for float64 inputs), the state before the
            sequence; under a group only rank 0's is read (other ranks get a zero gradient).
        output_final_state: also return the (B, H, D, E) state after this rank's piece.
        layout: "bhnd" or "bnhd"; both are read through strides, without copies, and the output
            comes back in the same layout.
        strategy: how states cross ranks under a group: "ring" (LASP: each rank receives the state
            from rank r-1 and sends its own to r+1), "allgather" (LASP-2: one all-gather of every
            rank's local state, combined on each rank), or "auto": the one lasp.scaling's cost model
            predicts to be faster for this group's size and node layout and this call's state size and
            transport (lasp.distributed.choose_strategy says which and why; the same on every rank, whatever
            the pieces' lengths; the first call on a group gathers its ranks' host names). All are exact.
        cu_seqlens: None, or the packed documents of one row (batch size 1): their global offsets
            [0, ..., N_total] (int32 / int64, any device), the same on every rank of the group, where
            each rank passes its contiguous piece (any length; a document may span any number of ranks,
            pieces may be empty). The state restarts at every document start: no token sees another
            document's. Works with decay, g and every head map; the op then runs with gates (-inf at
            each document start in the piece; the given g's values there get a zero gradient). Under a
            group it costs one small all-gather (the pieces' lengths and the call's description: every
            rank raises the same error on a bad call). Not yet with initial_state or output_final_state
            (one state per document): NotImplementedError.
    Returns:
        o in the layout and dtype of q, or (o, final_state) if output_final_state.
    """
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"lasp_attention: layout must be 'bhnd' or 'bnhd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lasp_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if layout == "bnhd":
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(
                    f"lasp_attention: {name} must be 4-D (batch, tokens, heads, head dim) for layout 'bnhd', "
                    f"got shape {tuple(t.shape)}"
                )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if g is not None:
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"lasp_attention: g must be a torch.Tensor or None, got {type(g).__name__}")
        if layout == "bnhd":
            if g.dim() != 3:
                raise ValueError(
                    "lasp_attention: g must be 3-D, one log gate per (batch, token, head) for layout 'bnhd', "
                    f"got shape {tuple(g.shape)}"
                )
            g = g.transpose(1, 2)
    if scale is None:
        if q.dim() < 1 or q.shape[-1] == 0:
            raise ValueError(f"lasp_attention: q must have a head dim of at least 1, got shape {tuple(q.shape)}")
        scale = q.shape[-1] ** -0.5
    from .distributed import _resolve_strategy

    strategy = _resolve_strategy("lasp_attention", strategy, group, q, v, gates=g is not None or cu_seqlens is not None,
                                 op="lasp_attention")
    if cu_seqlens is not None:
        g = _document_gates(q, v, g, cu_seqlens, group, initial_state is not None, bool(output_final_state))
    o, final_state = torch.ops.lasp.lasp_attention(
        q, k, v, decay, float(scale), initial_state, _group_name(group), strategy, g
    )
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, final_state) if output_final_state else o


def _document_gates(q, v, g, cu_seqlens, group, has_initial, wants_final):
    """The log gates of a packed call (bhnd view, (B, H, n)): g (or zeros) with -inf at every document start
    in this rank's piece. One all-gather under a group gives the piece's offset and lets every rank check
    the same things, so that all raise alike."""
    from .distributed import _cu_signature, _document_resets, _gather_rows, _raise_if_invalid, check_cu_seqlens

    fn = "lasp_attention"
    n, B = int(q.shape[2]), int(q.shape[0])
    cu, local_err = None, None
    try:
        cu = check_cu_seqlens(cu_seqlens, None, fn)
    except (TypeError, ValueError) as e:
        local_err = e
    # [n, B, states asked for, valid, then cu_seqlens' signature, the same on every rank]
    mine = [n, B, int(has_initial or wants_final), int(cu is not None)] + _cu_signature(cu)
    rows, rank = _gather_rows(group if _group_name(group) is not None else None, mine)
    _raise_if_invalid(rows, 3, local_err, "lasp_attention: cu_seqlens")
    if any(r[1] != 1 for r in rows):
        raise ValueError("lasp_attention: cu_seqlens needs one packed row (batch size 1), got batch sizes "
                         f"{[r[1] for r in rows]} (per group rank)")
    if any(r[2] for r in rows):
        raise NotImplementedError(
            "lasp_attention: initial_state and output_final_state with cu_seqlens (one state per document) are "
            "not supported yet; without cu_seqlens, lasp.distributed.document_reset_gates gives the gates that "
            "keep documents apart, with the initial state feeding the first document and the final state the "
            "last one's")
    if any(r[4:] != rows[0][4:] for r in rows):
        raise ValueError("lasp_attention: cu_seqlens must be the same on every rank of the group (the global "
                         f"document offsets); group ranks {[i for i, r in enumerate(rows) if r[4:] != rows[0][4:]]} "
                         "differ from group rank 0")
    total = sum(r[0] for r in rows)
    if int(cu[-1]) != total:
        raise ValueError(f"lasp_attention: the last offset of cu_seqlens ({int(cu[-1])}) must equal the packed "
                         f"length, the sum of the pieces' lengths over the group ({total})")
    offset = sum(r[0] for r in rows[:rank])
    reset = _document_resets(cu, offset, offset + n, q.device)
    if g is None:
        H = max(int(q.shape[1]), int(v.shape[1]))
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.zeros(1, H, n, dtype=acc, device=q.device).masked_fill(reset, float("-inf"))
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"lasp_attention: g must be a torch.Tensor or None, got {type(g).__name__}")
    return g.masked_fill(reset, float("-inf"))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head decay rates of TransNormerLLM / Lightning Attention (ALiBi slopes), float32 (num_heads,)."""
    return torch.ops.lasp.alibi_slopes(int(num_heads))


def set_group_checks(enabled: Optional[bool] = True, timeout_s: Optional[float] = None) -> None:
    """Checks against distributed misuse.

    While on, every lasp_attention call with a group (forward and backward) first all-gathers a small
    description of the call (batch size, heads, head dims, dtype, strategy, decay and g given) and every rank
    raises the same clear error when the ranks disagree (only sequence lengths may differ).

    enabled: True, False, or None for the default ("auto"): on for Gloo and other non-NCCL groups, where
        it costs one small collective per call; off for NCCL groups, where it also costs a host
        synchronisation per call (turn it on to debug). With checks off, ranks that disagree on shapes
        produce undefined results.
    timeout_s: bound on every wait on another rank (a rank that never calls then ends in a timeout
        error naming the step on the ranks that did call). The host then polls each exchange until it
        finishes (on NCCL a host synchronisation per exchange: for debugging). None: the process
        group's own timeout (init_process_group(timeout=...)).

    Start-up defaults come from the environment: LASP_CHECK_GROUP=0/1, LASP_CHECK_TIMEOUT_S.
    """
    torch.ops.lasp.set_group_checks(None if enabled is None else bool(enabled),
                                    None if timeout_s is None else float(timeout_s))


def set_ring_transport(transport: str) -> None:
    """How the ring's states travel between ranks that hold CUDA tensors.

    "auto" (default): "peer" for NCCL groups whose ranks can all use it, else "nccl". The ranks decide
        together at the first ring call per (group, device, state size): all on one host, and each able
        to map its neighbours' memory.
    "nccl": the process group's send/recv, for any backend and topology.
    "peer": one small kernel per hop receives the state, updates it and writes it straight into the next
        rank's GPU memory (mapped with CUDA IPC; no NCCL kernel, no copy). Every rank of the group must
        be on one node with peer access (NVLink or PCIe P2P); otherwise the call raises on every rank.
    The peer path applies to the "ring" strategy with float32 states (float16, bfloat16 and float32
    inputs); other calls use the process group. Mapping costs two small all-gathers over the group, once
    per (group, device, state size), and two states of B*H*D*E floats kept for the life of the process.
    A rank that never calls makes the others give up after the timeout of set_group_checks (then a clear
    error) or, without one, after 10 minutes (then a CUDA error, as NCCL's watchdog would end the job).
    While a CUDA graph is being captured, "auto" uses NCCL and "peer" raises.

    Every rank of a group must use the same setting (group checks compare it). Start-up default:
    env LASP_RING_TRANSPORT=auto|nccl|peer.
    """
    torch.ops.lasp.set_ring_transport(transport)  # raises ValueError for any other value


def get_ring_transport() -> str:
    """The ring transport setting ("auto", "nccl" or "peer"); see set_ring_transport."""
    return torch.ops.lasp.get_ring_transport()
