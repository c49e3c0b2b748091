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
            shared B and C). States, decay and g are per output head. CUDA tensors take Hk = Hv for now
            (other head maps raise NotImplementedError there).
        decay: None (no decay) or a float tensor (H,) of rates >= 0 (see alibi_slopes); a constant.
        g: None or per-token log gates (B, H, N) for layout "bhnd", (B, N, H) for "bnhd", values <= 0
            (-inf resets the state), any float dtype, computed in float32 (float64 for float64 inputs);
            differentiable, also across ranks. Under a group each rank passes the gates of its piece.
            CPU tensors only for now (CUDA raises NotImplementedError).
        scale: defaults to 1/sqrt(D).
        group: a torch.distributed ProcessGroup over which the sequence is split (group rank i holds
            the i-th contiguous piece; pieces may differ in length). None: the whole sequence is here.
        initial_state: (B, H, D, E) float32 (float64 for float64 inputs), the state before the
            sequence; under a group only rank 0's is read (other ranks get a zero gradient).
        output_final_state: also return the (B, H, D, E) state after this rank's piece.
        layout: "bhnd" or "bnhd"; both are read through strides, without copies, and the output
            comes back in the same layout.
        strategy: how states cross ranks under a group: "ring" (LASP: each rank receives the state
            from rank r-1 and sends its own to r+1) or "allgather" (LASP-2: one all-gather of every
            rank's local state, combined on each rank). Both are exact.
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
    if strategy not in ("ring", "allgather"):
        raise ValueError(f"lasp_attention: strategy must be 'ring' or 'allgather', got {strategy!r}")
    o, final_state = torch.ops.lasp.lasp_attention(
        q, k, v, decay, float(scale), initial_state, _group_name(group), strategy, g
    )
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, final_state) if output_final_state else o


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
