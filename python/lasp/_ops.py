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


_LIBRARY: Optional[str] = None  # the path of the compiled library this process loaded (benchmarks record it)


def _load() -> None:
    global _LIBRARY
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
    _LIBRARY = path


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
            shared B and C). States, decay and g are per output head. On CUDA every map runs on the
            tensor-core kernels (bf16 / fp16; with g only on wgmma, D, E in {64, 128}, sm_90); at head dims
            above 128 only MHA, GQA and MQA without g do, other maps there run on the generic kernels.
        decay: None (no decay) or a float tensor (H,) of rates >= 0 (see alibi_slopes; a negative rate raises); a
            constant.
        g: None or per-token log gates (B, H, N) for layout "bhnd", (B, N, H) for "bnhd", values <= 0
            (-inf resets the state; a positive or NaN value raises a ValueError: set_value_checks), any
            float dtype, computed in float32 (float64 for float64 inputs); differentiable, also across ranks.
            Under a group each rank passes the gates of its piece.
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
            rank's local state, combined on each rank), "scan" (a recursive-doubling prefix scan of the
            pieces' maps: ceil(log2 W) rounds of one state per rank), or "auto": of the ring and the
            all-gather, the one lasp.scaling's cost model
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
            rank raises the same error on a bad call). The offsets are read to the host and checked once
            per tensor while it lives and its version counter is unchanged (layers sharing it reuse the
            result). Per-document states: initial_state is then
            (num_docs, H, D, E) in the accumulation dtype, the same shape on every rank, document j's row
            read on the rank where j starts (the others get a zero gradient for it; the gate of j's first
            token multiplies it, as in the plain op); output_final_state returns (num_docs, H, D, E): the
            final states of the documents ending in this rank's piece, zeros elsewhere (their sum over the
            group is every document's). Each document is then exactly the op on it alone with its initial
            state, with exact gradients (also across ranks). The op then runs on each piece alone, after one
            more all-gather of one (H, D, E) state per rank (strategy is not used); PyTorch operations over
            the piece's documents add the states' terms. initial_state (or None) and output_final_state
            must be alike on every rank.
    Returns:
        o in the layout and dtype of q, or (o, final_state) if output_final_state.
    """
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"lasp_attention: layout must be 'bhnd' or 'bnhd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lasp_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("decay", decay), ("initial_state", initial_state)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"lasp_attention: {name} must be a torch.Tensor or None, got {type(t).__name__}")
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
        if not g.is_floating_point():
            raise TypeError(f"lasp_attention: g must be a floating tensor (log gates), got {g.dtype} (documents "
                            "packed into a row are given by cu_seqlens)")
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
    else:
        scale = _real_scale("lasp_attention", scale)
    from .distributed import _resolve_strategy

    strategy = _resolve_strategy("lasp_attention", strategy, group, q, v, gates=g is not None or cu_seqlens is not None,
                                 op="lasp_attention")
    if cu_seqlens is not None:
        if initial_state is not None or output_final_state:
            o, final_state = _packed_with_states(q, k, v, decay, g, float(scale), cu_seqlens, group, strategy,
                                                 initial_state, bool(output_final_state))
            if layout == "bnhd":
                o = o.transpose(1, 2)
            return (o, final_state) if output_final_state else o
        g = _document_gates(q, v, g, cu_seqlens, group, False, False)
    o, final_state = torch.ops.lasp.lasp_attention(
        q, k, v, decay, float(scale), initial_state, _group_name(group), strategy, g
    )
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, final_state) if output_final_state else o


def _document_gates(q, v, g, cu_seqlens, group, has_initial, wants_final):
    """The log gates of a packed call (bhnd view, (B, H, n)): g with -inf at every document start in this
    rank's piece; without g, the starts themselves (bool, the op's document starts, which take no gradient).
    One all-gather under a group gives the piece's offset and lets every rank check the same things, so that
    all raise alike."""
    off, offset, _, _ = _packed_plan(q, None, v, None, g, None, cu_seqlens, group, None, None, has_initial,
                                     wants_final)
    n = int(q.shape[2])
    reset = off.starts(offset, offset + n, q.device)
    if g is None:
        return reset.expand(1, max(int(q.shape[1]), int(v.shape[1])), n)
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"lasp_attention: g must be a torch.Tensor or None, got {type(g).__name__}")
    return g.masked_fill(reset, float("-inf"))


def _acc_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _real_scale(fn: str, scale) -> float:
    """``scale`` as a float, or a TypeError that names it (checked before any rank talks to another)."""
    try:
        return float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{fn}: scale must be a real number or None, got {scale!r}") from None


def _check_states_call(q, k, v, decay, g, scale, strategy, initial_state, num_docs):
    """Rank-local checks of a packed call with per-document states (raises what the op would raise, and
    names initial_state's expected shape and dtype): the op itself then runs without the group, whose
    checks it would otherwise make."""
    n = int(q.shape[2])
    cut = lambda t: t.narrow(2, 0, 0) if t.dim() >= 3 and int(t.shape[2]) == n else t  # noqa: E731
    with torch.no_grad():
        torch.ops.lasp.lasp_attention(cut(q), cut(k), cut(v), decay, scale, None, None, strategy,
                                      None if g is None else cut(g))
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(f"lasp_attention: initial_state must be a torch.Tensor or None, got "
                        f"{type(initial_state).__name__}")
    H = max(int(q.shape[1]), int(v.shape[1]))
    want = (num_docs, H, int(q.shape[3]), int(v.shape[3]))
    if tuple(initial_state.shape) != want:
        raise ValueError(f"lasp_attention: with cu_seqlens, initial_state must have shape (num_docs, H, D, E) = "
                         f"{want} (one state per document), got {tuple(initial_state.shape)}")
    if initial_state.dtype != _acc_dtype(q):
        raise TypeError(f"lasp_attention: initial_state must be {_acc_dtype(q)} (the accumulation dtype of "
                        f"{q.dtype} inputs), got {initial_state.dtype}")
    if initial_state.device != q.device:
        raise ValueError(f"lasp_attention: initial_state must be on q's device ({q.device}), got "
                         f"{initial_state.device}")


def _packed_plan(q, k, v, decay, g, scale, cu_seqlens, group, strategy, initial_state, has_initial, wants_final):
    """The checks of a packed call, alike on every rank (one small all-gather under a group): returns the
    checked offsets (distributed._Offsets: .cu CPU int64), this rank's piece offset, every rank's row and this
    rank's index."""
    from .distributed import _checked_offsets, _cu_signature, _gather_rows, _raise_if_invalid

    n, B = int(q.shape[2]), int(q.shape[0])
    off, cu, local_err, states_err = None, None, None, None
    try:
        off = _checked_offsets(cu_seqlens, "lasp_attention")
        cu = off.cu
    except (TypeError, ValueError) as e:
        local_err = e
    if (has_initial or wants_final) and cu is not None and B == 1:
        try:
            _check_states_call(q, k, v, decay, g, scale, strategy, initial_state, cu.numel() - 1)
        except (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError) as e:
            states_err = e
    # [n, B, initial_state given, final states asked for, cu valid, states' call valid, then cu_seqlens'
    # signature, the same on every rank]
    mine = [n, B, int(has_initial), int(wants_final), int(cu is not None), int(states_err is None)] + (
        off.signature if off is not None else _cu_signature(None))
    rows, rank = _gather_rows(group if _group_name(group) is not None else None, mine)
    _raise_if_invalid(rows, 4, local_err, "lasp_attention: cu_seqlens")
    if any(r[1] != 1 for r in rows):
        raise ValueError("lasp_attention: cu_seqlens needs one packed row (batch size 1), got batch sizes "
                         f"{[r[1] for r in rows]} (per group rank)")
    for col, what in ((2, "initial_state given (or None)"), (3, "output_final_state")):
        if any(r[col] != rows[0][col] for r in rows):
            raise ValueError(f"lasp_attention: with cu_seqlens, {what} must be the same on every rank of the group; "
                             f"group ranks {[i for i, r in enumerate(rows) if r[col] != rows[0][col]]} differ from "
                             "group rank 0")
    if any(r[6:] != rows[0][6:] for r in rows):
        raise ValueError("lasp_attention: cu_seqlens must be the same on every rank of the group (the global "
                         f"document offsets); group ranks {[i for i, r in enumerate(rows) if r[6:] != rows[0][6:]]} "
                         "differ from group rank 0")
    total = sum(r[0] for r in rows)
    if int(cu[-1]) != total:
        raise ValueError(f"lasp_attention: the last offset of cu_seqlens ({int(cu[-1])}) must equal the packed "
                         f"length, the sum of the pieces' lengths over the group ({total})")
    _raise_if_invalid(rows, 5, states_err, "lasp_attention: the call with per-document states (initial_state, "
                                           "q, k, v, decay, g)")
    offset = sum(r[0] for r in rows[:rank])
    return off, offset, rows, rank


def _start_mask(local_starts, n, dev):
    """(n,) bool on dev: True at the local positions of local_starts [(document, position)]."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[s for _, s in local_starts]] = True
    return mask.to(dev)


def _heads(x, H, acc):
    """(1, h, m, d) -> (H, m, d) in acc: output head i reads head i // (H / h)."""
    x = x[0].to(acc)
    return x if x.shape[0] == H else x.repeat_interleave(H // x.shape[0], dim=0)


def _packed_with_states(q, k, v, decay, g, scale, cu_seqlens, group, strategy, initial_state, wants_final):
    """A packed call with per-document states (bhnd view): returns (o, final_states).

    The state is linear, so each rank (1) forms the state open at its piece's end from its own tokens after
    the piece's last document start (plus that document's initial state) and the piece's transition (the
    exp of its summed log gates without a start, else 0); (2) one differentiable all-gather of these pairs
    and a scan over the ranks before it give its incoming state; (3) the op runs on the piece alone with
    that incoming state (a document's own initial state when one starts exactly at the piece's start) and
    -inf gates at the other starts; (4) documents starting inside the piece get their initial state's term
    q[t] exp(G[s..t]) S0 added; (5) the final states of the documents ending in the piece are formed from
    their tokens in the piece. Steps (1), (4), (5) loop over the piece's documents (batched over heads and
    tokens); together they cost about two dense passes over the piece's q, k, v (no per-token loop)."""
    from torch.distributed.nn.functional import all_gather

    has_initial = initial_state is not None
    off, P, rows, rank = _packed_plan(q, k, v, decay, g, scale, cu_seqlens, group, strategy, initial_state,
                                      has_initial, wants_final)
    cu = off.cu
    acc, dev = _acc_dtype(q), q.device
    n, D, E = int(q.shape[2]), int(q.shape[3]), int(v.shape[3])
    H = max(int(q.shape[1]), int(v.shape[1]))
    num_docs = cu.numel() - 1
    starts, ends = cu[:-1].tolist(), cu[1:].tolist()
    Q = P + n
    # log gates a = g - decay of the piece, (H, n); sums over [i, j) from prefix sums of the finite part (in
    # float64: differences of prefix sums keep their precision) and counts of -inf (a reset inside the span)
    a = torch.zeros(H, n, dtype=acc, device=dev) if g is None else g[0].to(acc)
    if decay is not None:
        a = a - decay.to(dev, acc).view(H, 1)
    local_starts = [(j, starts[j] - P) for j in range(num_docs) if P <= starts[j] < Q]
    if not has_initial and local_starts:  # the gate at a start only ever multiplies a zero state: exact zero
        a = a.masked_fill(_start_mask(local_starts, n, dev), 0.0)  # gradient, as without states
    neginf = torch.isneginf(a)
    fin = a.masked_fill(neginf, 0.0).double()
    zero_col = torch.zeros(H, 1, dtype=torch.float64, device=dev)
    Fz = torch.cat([zero_col, fin.cumsum(-1)], -1)  # (H, n + 1)
    Kz = torch.cat([zero_col, neginf.double().cumsum(-1)], -1)

    def decays(i, j):
        """exp(sum of a over [i, j)) for broadcast indices (ints or 1-D tensors), (H, m) in acc (m = 1 for
        two ints)."""
        i, j = (torch.as_tensor(x, device=dev).view(-1) for x in (i, j))
        w = torch.exp(Fz[:, j] - Fz[:, i])
        return w.masked_fill(Kz[:, j] - Kz[:, i] > 0, 0.0).to(acc)

    def kv_state(s, e):
        """sum over t in [s, e) of exp(a over (t, e)) k[t]^T v[t], (H, D, E)."""
        w = decays(torch.arange(s + 1, e + 1, device=dev), e)  # (H, e - s)
        kk = _heads(k[:, :, s:e], H, acc) * w.unsqueeze(-1)
        return kk.transpose(1, 2) @ _heads(v[:, :, s:e], H, acc)

    # (1) the piece's transition and the state open at its end, without the incoming state
    if local_starts:
        j_last, s_last = local_starts[-1]
        L = kv_state(s_last, n)
        if has_initial:
            L = L + decays(s_last, n).view(H, 1, 1) * initial_state[j_last]
        T = torch.zeros(H, dtype=acc, device=dev)
    else:
        L, T = kv_state(0, n), decays(0, n).view(H)
    # (2) one all-gather of (T, L) per rank; this rank's incoming state is the scan over the ranks before it
    pack = torch.cat([T.view(H, 1), L.reshape(H, D * E)], 1)
    gathered = list(all_gather(pack, group=group)) if _group_name(group) is not None else [pack]
    out = torch.zeros(H, D, E, dtype=acc, device=dev)
    for p in range(rank):
        out = gathered[p][:, :1].view(H, 1, 1) * out + gathered[p][:, 1:].view(H, D, E)
    # every rank's outputs depend on the gathered pairs and on initial_state (with a zero gradient where
    # unused), so that every rank's backward runs the all-gather's backward collective, and initial_state gets
    # a (zero) gradient on ranks where no document starts
    never = torch.zeros((), dtype=torch.bool, device=dev)
    link = torch.stack(gathered).sum() + (initial_state.sum() if has_initial else 0.0)
    start_here = n > 0 and local_starts and local_starts[0][1] == 0
    if start_here:
        incoming = initial_state[local_starts[0][0]] if has_initial else torch.zeros(H, D, E, dtype=acc, device=dev)
    else:
        incoming = out
    incoming = torch.where(never, link, incoming)
    # (3) the op on the piece alone: -inf gates at the starts in the piece, except one at the piece's start
    # when that document's initial state is the incoming state
    reset = _start_mask([(j, s) for j, s in local_starts if s > 0 or not has_initial], n, dev).view(1, 1, n)
    if g is None and not bool(reset.any()):
        gop = None  # the plain (ungated) op
    else:
        gop = reset.expand(1, H, n) if g is None else g.masked_fill(reset, float("-inf"))
    o, _ = torch.ops.lasp.lasp_attention(q, k, v, decay, scale, incoming.unsqueeze(0).contiguous(), None,
                                         strategy, gop)
    # (4) the initial-state terms of the documents starting inside the piece
    inside = [(j, s) for j, s in local_starts if s > 0]
    if has_initial and inside:
        terms = []
        for j, s in inside:
            e = min(ends[j], Q) - P
            w = decays(s, torch.arange(s + 1, e + 1, device=dev))  # (H, e - s)
            terms.append((scale * w).unsqueeze(-1) * (_heads(q[:, :, s:e], H, acc) @ initial_state[j]))
        s0 = inside[0][1]
        o = torch.cat([o[:, :, :s0], (o[:, :, s0:].to(acc) + torch.cat(terms, 1).unsqueeze(0)).to(o.dtype)], 2)
    if not wants_final:
        return o, None
    # (5) the final states of the documents ending in the piece, zeros elsewhere
    rows_idx, states = [], []
    for j in range(num_docs):
        if not P < ends[j] <= Q:
            continue
        e, s = ends[j] - P, starts[j] - P
        if e == n:
            Fj = T.view(H, 1, 1) * incoming + L
        elif s > 0:
            Fj = kv_state(s, e)
            if has_initial:
                Fj = Fj + decays(s, e).view(H, 1, 1) * initial_state[j]
        else:
            Fj = kv_state(0, e) + decays(0, e).view(H, 1, 1) * incoming
        rows_idx.append(j)
        states.append(Fj)
    final = torch.zeros(num_docs, H, D, E, dtype=acc, device=dev)
    if states:
        final = final.index_copy(0, torch.tensor(rows_idx, device=dev), torch.stack(states))
    return o, torch.where(never, link, final)


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


def set_value_checks(enabled: bool = True) -> None:
    """Whether lasp_attention and gated_delta_attention read the values of g and decay.

    On (the default): a positive or NaN log gate in g, or a negative decay rate, raises a ValueError. On the
    CPU the values are read at once. On a GPU one small kernel flags bad gates ahead of the op's kernels and
    the op waits for it once they are queued: no host sync comes before its kernels, but a host that runs
    ahead of the GPU waits at each gated call until the GPU reaches it. decay is read once per tensor and
    in-place version. Off: no value is read (bad values then give undefined results), for the last bit of
    host-side overlap. Start-up default from the environment: LASP_CHECK_VALUES=0/1.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_value_checks: enabled must be a bool, got {type(enabled).__name__}")
    torch.ops.lasp.set_value_checks(enabled)


def get_value_checks() -> bool:
    """Whether the ops read the values of g and decay in the calling thread (set_value_checks; inside
    gated_delta_attention under a group, which reads g itself first, its C++ ops do not)."""
    return bool(torch.ops.lasp.get_value_checks())


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
