"""lasp_attention(..., cu_seqlens=...): packed documents of one row, on one rank and across ranks (Gloo).

The reference of a packed call is the op run on each document alone (no cu_seqlens), concatenated: every
output and every gradient (q, k, v, g) must match it, in float64 on the CPU; with per-document states
(initial_state (num_docs, H, D, E), output_final_state) also the final states and dS0, under nonzero
final-state cotangents. Across ranks each rank passes
its contiguous piece (uneven, empty pieces, documents spanning ranks, a boundary exactly on a rank
boundary, documents of one token) and must match the same slice of the one-rank packed call (final states
and dS0: their sum over the ranks). Bad calls
raise a named error, the same on every rank.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from conftest import gen, import_lasp, randn, record_errors, spawn_world

F64 = torch.float64
SPAWN_DEADLINE_S = 180
PG_TIMEOUT_S = 90


def _problem(seed, N, Hq, Hk, Hv, D, E, gates, layout):
    g_ = gen(seed)
    H = max(Hq, Hv)
    shp = (lambda h, x: (1, h, N, x)) if layout == "bhnd" else (lambda h, x: (1, N, h, x))
    q, k, v = randn(shp(Hq, D), g_, F64), randn(shp(Hk, D), g_, F64), randn(shp(Hv, E), g_, F64)
    do = randn(shp(H, E), g_, F64)
    g = None
    if gates:
        g = -torch.nn.functional.softplus(randn((1, H, N), g_, F64) - 1.0)
        if layout == "bnhd":
            g = g.transpose(1, 2).contiguous()
    decay = (torch.rand(H, generator=g_, dtype=F64) * 0.2).float()
    return q, k, v, g, decay, do


def _seq(layout):
    return 2 if layout == "bhnd" else 1


def _grads(lasp, q, k, v, g, decay, do, layout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gl = None if g is None else g.detach().clone().requires_grad_()
    o = lasp.lasp_attention(*leaves, decay, g=gl, layout=layout, **kw)
    ins = leaves + ([gl] if gl is not None else [])
    gr = torch.autograd.grad(o, ins, do)
    out = dict(o=o.detach(), dq=gr[0], dk=gr[1], dv=gr[2])
    if gl is not None:
        out["dg"] = gr[3]
    return out


def _per_document(lasp, q, k, v, g, decay, do, layout, cu):
    """The reference: each document alone, concatenated along the tokens."""
    d, parts = _seq(layout), []
    gd = 2 if layout == "bhnd" else 1
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sl = lambda t: t.narrow(d, a, b - a)  # noqa: E731
        parts.append(_grads(lasp, sl(q), sl(k), sl(v), None if g is None else g.narrow(gd, a, b - a), decay,
                            sl(do), layout))
    out = {}
    for key in parts[0]:
        out[key] = torch.cat([p[key] for p in parts], dim=gd if key == "dg" else d)
    return out


CASES = [
    # (doc lengths, Hq, Hk, Hv, D, E, gates, layout)
    ([5, 1, 9, 1, 1, 20], 2, 2, 2, 8, 6, "gates", "bhnd"),
    ([37], 4, 2, 2, 16, 8, "gates", "bnhd"),              # one document: the plain call
    ([1, 1, 1, 1], 2, 1, 1, 4, 4, "nogates", "bhnd"),     # documents of one token, MQA, decay only
    ([30, 70, 3, 29], 1, 1, 4, 8, 12, "gates", "bnhd"),   # GVA (Mamba-2-like shared q, k)
    ([64, 64, 1, 63], 2, 2, 2, 16, 16, "nogates", "bnhd"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"docs{len(c[0])}-q{c[1]}k{c[2]}v{c[3]}-{c[6]}-{c[7]}" for c in CASES])
def test_packed_matches_each_document_alone(lasp, case, seed):
    lens, Hq, Hk, Hv, D, E, gates, layout = case
    N = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, g, decay, do = _problem(seed, N, Hq, Hk, Hv, D, E, gates == "gates", layout)
    got = _grads(lasp, q, k, v, g, decay, do, layout, cu_seqlens=cu)
    want = _per_document(lasp, q, k, v, g, decay, do, layout, cu)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{key}: {m}")
    # and the documents really are cut: the same call without cu_seqlens differs (more than one document)
    if len(lens) > 1:
        plain = _grads(lasp, q, k, v, g, decay, do, layout)
        assert not torch.allclose(plain["o"], got["o"])


@pytest.mark.parametrize("case", [c for c in CASES if c[6] == "nogates"],
                         ids=[f"docs{len(c[0])}-q{c[1]}k{c[2]}v{c[3]}-{c[7]}" for c in CASES if c[6] == "nogates"])
def test_packed_starts_as_gates_match_each_document_alone(lasp, case, seed, monkeypatch):
    """LASP_DOC_STARTS=0 (the starts run as -inf gates, dg computed and dropped) on the CPU: every output and
    gradient equals each document alone in float64, as with the default (the starts as such)."""
    monkeypatch.setenv("LASP_DOC_STARTS", "0")
    lens, Hq, Hk, Hv, D, E, _, layout = case
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, g, decay, do = _problem(seed, sum(lens), Hq, Hk, Hv, D, E, False, layout)
    got = _grads(lasp, q, k, v, g, decay, do, layout, cu_seqlens=cu)
    want = _per_document(lasp, q, k, v, g, decay, do, layout, cu)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{key}: {m}")


def test_packed_gradient_at_document_starts_is_zero(lasp, seed):
    """The given g at a document start has no effect (the state there is zero): its gradient is exactly 0."""
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int64)
    q, k, v, g, decay, do = _problem(seed, 20, 2, 2, 2, 4, 4, True, "bhnd")
    got = _grads(lasp, q, k, v, g, decay, do, "bhnd", cu_seqlens=cu)
    assert torch.all(got["dg"][:, :, [0, 7, 8]] == 0)
    assert torch.any(got["dg"][:, :, 9:] != 0)


def test_packed_bad_doc_starts_setting(lasp, monkeypatch):
    """A LASP_DOC_STARTS other than 0 or 1 is an error that names it (not a silent default)."""
    monkeypatch.setenv("LASP_DOC_STARTS", "yes")
    q = torch.randn(1, 2, 10, 4, dtype=F64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="LASP_DOC_STARTS must be '0' or '1', got 'yes'"):
        lasp.lasp_attention(q, q, q, lasp.alibi_slopes(2).double(), cu_seqlens=cu)


def test_packed_bad_calls(lasp):
    q = torch.randn(1, 2, 10, 4, dtype=F64)
    k, v = q.clone(), q.clone()
    good = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens needs one packed row .batch size 1."):
        q2 = torch.randn(2, 2, 10, 4, dtype=F64)
        lasp.lasp_attention(q2, q2, q2, cu_seqlens=good)
    with pytest.raises(ValueError, match="^lasp_attention: cu_seqlens must be strictly increasing"):
        lasp.lasp_attention(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match=r"last offset of cu_seqlens \(9\) must equal the packed length"):
        lasp.lasp_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(TypeError, match="^lasp_attention: cu_seqlens must be int32 or int64"):
        lasp.lasp_attention(q, k, v, cu_seqlens=torch.tensor([0.0, 4.0, 10.0]))
    with pytest.raises(ValueError, match="^lasp_attention: cu_seqlens must start at 0"):
        lasp.lasp_attention(q, k, v, cu_seqlens=torch.tensor([1, 4, 10]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(num_docs, H, D, E\) = \(2, 2, 4, 4\)"):
        lasp.lasp_attention(q, k, v, cu_seqlens=good, initial_state=torch.zeros(1, 2, 4, 4, dtype=F64))
    with pytest.raises(TypeError, match="initial_state must be torch.float64"):
        lasp.lasp_attention(q, k, v, cu_seqlens=good, initial_state=torch.zeros(2, 2, 4, 4))
    with pytest.raises(TypeError, match="initial_state must be torch.float32"):
        lasp.lasp_attention(q.float(), k.float(), v.float(), cu_seqlens=good, initial_state=torch.zeros(2, 2, 4, 4,
                                                                                                     dtype=F64))
    with pytest.raises(RuntimeError, match="decay must have one rate per output head"):
        lasp.lasp_attention(q, k, v, torch.zeros(3), cu_seqlens=good, output_final_state=True)
    with pytest.raises(RuntimeError, match="k must have the sequence length of q"):
        lasp.lasp_attention(q, k[:, :, :9], v, cu_seqlens=good, output_final_state=True)


def test_packed_offsets_checked_once_per_tensor_version(lasp, monkeypatch):
    """The offsets' checks (a host read of cu_seqlens) run once per tensor: a second call with the same tensor
    reuses them, a change in place (version counter) is checked again and its error raised, a new tensor with
    the same values is checked on its own, and an inference tensor (no version counter) at every call."""
    import lasp.distributed as ld

    calls = []
    real = ld._check_cu_seqlens
    monkeypatch.setattr(ld, "_check_cu_seqlens", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, _, decay, do = _problem(3, 10, 2, 2, 2, 4, 4, None, "bhnd")
    cu = torch.tensor([0, 4, 10])
    ref = _per_document(lasp, q, k, v, None, decay, do, "bhnd", cu)["o"]
    for n in (1, 1):
        torch.testing.assert_close(lasp.lasp_attention(q, k, v, decay, cu_seqlens=cu), ref, rtol=1e-12, atol=1e-12)
        assert len(calls) == n
    cu[1] = 6  # still valid: the result follows the new offsets
    want = _per_document(lasp, q, k, v, None, decay, do, "bhnd", cu)["o"]
    torch.testing.assert_close(lasp.lasp_attention(q, k, v, decay, cu_seqlens=cu), want, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2
    cu[1] = 0  # now invalid: raised, not served from before
    with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
        lasp.lasp_attention(q, k, v, decay, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
        lasp.lasp_attention(q, k, v, decay, cu_seqlens=cu)
    lasp.lasp_attention(q, k, v, decay, cu_seqlens=torch.tensor([0, 6, 10]))
    assert len(calls) == 5
    with torch.inference_mode():
        cu_inf = torch.tensor([0, 6, 10])
    for n in (6, 7):
        torch.testing.assert_close(lasp.lasp_attention(q, k, v, decay, cu_seqlens=cu_inf), want, rtol=1e-12,
                                   atol=1e-12)
        assert len(calls) == n
    # the delta-rule op shares the offsets' checks
    g = -torch.rand(1, 2, 10, dtype=F64)
    beta = torch.rand(1, 2, 10, dtype=F64)
    cu2 = torch.tensor([0, 3, 10])
    a = lasp.gated_delta_attention(q, k, v, g, beta, cu_seqlens=cu2)
    b = lasp.gated_delta_attention(q, k, v, g, beta, cu_seqlens=cu2)
    assert len(calls) == 8
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Per-document states: initial_state (num_docs, H, D, E) and output_final_state with cu_seqlens


def _states(seed, num_docs, H, D, E):
    g_ = gen(seed + 7)
    return randn((num_docs, H, D, E), g_, F64), randn((num_docs, H, D, E), g_, F64)


def _grads_states(lasp, q, k, v, g, S0, decay, do, dF, layout, **kw):
    """Outputs, final states and the gradients of <o, do> + <final, dF> (S0 None: no initial state)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gl = None if g is None else g.detach().clone().requires_grad_()
    sl = None if S0 is None else S0.detach().clone().requires_grad_()
    o, f = lasp.lasp_attention(*leaves, decay, g=gl, layout=layout, initial_state=sl, output_final_state=True, **kw)
    ins = leaves + [t for t in (gl, sl) if t is not None]
    gr = list(torch.autograd.grad((o * do).sum() + (f * dF).sum(), ins))
    out = dict(o=o.detach(), final=f.detach(), dq=gr[0], dk=gr[1], dv=gr[2])
    if gl is not None:
        out["dg"] = gr[3]
    if sl is not None:
        out["dS0"] = gr[-1]
    return out


def _per_document_states(lasp, q, k, v, g, S0, decay, do, dF, layout, cu):
    """The reference: each document alone (no cu_seqlens) with its initial state and final state."""
    d, gd, parts = _seq(layout), (2 if layout == "bhnd" else 1), []
    for j, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = lambda t: t.narrow(d, a, b - a)  # noqa: E731
        parts.append(_grads_states(lasp, sl(q), sl(k), sl(v), None if g is None else g.narrow(gd, a, b - a),
                                   None if S0 is None else S0[j:j + 1], decay, sl(do), dF[j:j + 1], layout))
    out = {}
    for key in parts[0]:
        dim = {"dg": gd, "final": 0, "dS0": 0}.get(key, d)
        out[key] = torch.cat([p[key] for p in parts], dim=dim)
    return out


def _check_all(got, want, what, tol=1e-10):
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=tol, atol=tol, msg=lambda m: f"{what} {key}: {m}")


STATE_CASES = [
    # (doc lengths, Hq, Hk, Hv, D, E, gates, layout, initial_state given)
    ([5, 1, 9, 1, 1, 20], 2, 2, 2, 8, 6, "gates", "bhnd", True),
    ([5, 1, 9, 1, 1, 20], 2, 2, 2, 8, 6, "gates", "bnhd", False),  # final states only
    ([37], 4, 2, 2, 16, 8, "gates", "bnhd", True),                 # one document: the plain call
    ([1, 1, 1, 1], 2, 1, 1, 4, 4, "nogates", "bhnd", True),        # documents of one token, MQA, decay only
    ([30, 70, 3, 29], 1, 1, 4, 8, 12, "gates", "bnhd", True),      # GVA (Mamba-2-like shared q, k)
    ([64, 64, 1, 63], 2, 2, 2, 16, 16, "nogates", "bnhd", False),
    ([12, 20, 8], 4, 2, 4, 8, 8, "resets", "bhnd", True),          # g = -inf inside documents too
]


@pytest.mark.parametrize("case", STATE_CASES,
                         ids=[f"docs{len(c[0])}-q{c[1]}k{c[2]}v{c[3]}-{c[6]}-{c[7]}-{'S0' if c[8] else 'noS0'}"
                              for c in STATE_CASES])
def test_packed_states_match_each_document_alone(lasp, case, seed):
    lens, Hq, Hk, Hv, D, E, gates, layout, init = case
    N, H = sum(lens), max(Hq, Hv)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, g, decay, do = _problem(seed, N, Hq, Hk, Hv, D, E, gates != "nogates", layout)
    if gates == "resets":  # a reset inside a document and one at a document's start
        g[:, :, [4, 13, 32]] = float("-inf")
    S0, dF = _states(seed, len(lens), H, D, E)
    S0 = S0 if init else None
    got = _grads_states(lasp, q, k, v, g, S0, decay, do, dF, layout, cu_seqlens=cu)
    want = _per_document_states(lasp, q, k, v, g, S0, decay, do, dF, layout, cu)
    _check_all(got, want, "packed")


def test_packed_states_random_documents(lasp, seed):
    """Random document lengths (many of one token), head maps and layouts, against each document alone."""
    g_ = gen(seed)
    for trial in range(6):
        ndocs = int(torch.randint(1, 7, (1,), generator=g_))
        lens = [int(x) for x in torch.randint(1, 12, (ndocs,), generator=g_)]
        lens = [1 if x > 8 else x for x in lens]
        Hq, Hk, Hv = [(2, 2, 2), (4, 2, 2), (2, 1, 1), (1, 1, 2)][trial % 4]
        layout = ("bhnd", "bnhd")[trial % 2]
        N, H = sum(lens), max(Hq, Hv)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
        q, k, v, g, decay, do = _problem(seed + trial, N, Hq, Hk, Hv, 4, 6, trial % 3 != 2, layout)
        S0, dF = _states(seed + trial, ndocs, H, 4, 6)
        S0 = S0 if trial % 4 != 3 else None
        got = _grads_states(lasp, q, k, v, g, S0, decay, do, dF, layout, cu_seqlens=cu)
        want = _per_document_states(lasp, q, k, v, g, S0, decay, do, dF, layout, cu)
        _check_all(got, want, f"trial {trial} lens {lens}")


def test_packed_states_gradient_at_document_starts(lasp, seed):
    """With an initial state the gate at a document start multiplies it (a real gradient); without one (only
    output_final_state) the state before the start is zero and the given g there gets exactly 0."""
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int64)
    q, k, v, g, decay, do = _problem(seed, 20, 2, 2, 2, 4, 4, True, "bhnd")
    S0, dF = _states(seed, 3, 2, 4, 4)
    with_s0 = _grads_states(lasp, q, k, v, g, S0, decay, do, dF, "bhnd", cu_seqlens=cu)
    assert torch.all(with_s0["dg"][:, :, [0, 7, 8]] != 0)
    without = _grads_states(lasp, q, k, v, g, None, decay, do, dF, "bhnd", cu_seqlens=cu)
    assert torch.all(without["dg"][:, :, [0, 7, 8]] == 0)
    # output_final_state alone leaves the outputs of the plain packed call unchanged
    plain = _grads(lasp, q, k, v, g, decay, do, "bhnd", cu_seqlens=cu)
    torch.testing.assert_close(without["o"], plain["o"], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Across ranks (Gloo)

# (doc lengths, pieces per rank, layout, strategy list)
DIST = {
    2: [([5, 1, 9, 1, 4], [10, 10], "bhnd"),       # a document boundary exactly on the rank boundary
        ([3, 17], [0, 20], "bnhd"),                # an empty piece
        ([20], [7, 13], "bhnd")],                  # one document spanning both ranks
    3: [([2, 1, 1, 30, 6], [3, 1, 36], "bnhd"),    # a rank holding one token, documents of one token
        ([11, 11, 11], [11, 0, 22], "bhnd")],      # boundaries on rank boundaries, an empty middle piece
    4: [([40, 1, 1, 8], [5, 5, 5, 35], "bhnd")],   # a document across three ranks
}


# (strategy, initial_state given) of the per-document states' runs ("auto" resolves to one of the two)
STATE_RUNS = [("ring", True), ("allgather", True), ("auto", False)]


def _dist_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    lasp = import_lasp()
    results = {}
    for ci, (lens, pieces, layout) in enumerate(DIST[world]):
        N = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
        q, k, v, g, decay, do = _problem(1000 + 10 * world + ci, N, 2, 1, 2, 8, 4, True, layout)
        P, n = sum(pieces[:rank]), pieces[rank]
        d, gd = _seq(layout), (2 if layout == "bhnd" else 1)
        sl = lambda t: t.narrow(d, P, n).contiguous()  # noqa: E731
        for strategy in ("ring", "allgather", "scan"):
            results[(ci, strategy)] = _grads(lasp, sl(q), sl(k), sl(v), g.narrow(gd, P, n).contiguous(), decay,
                                             sl(do), layout, cu_seqlens=cu, group=dist.group.WORLD,
                                             strategy=strategy)
        S0, dF = _states(1000 + 10 * world + ci, len(lens), 2, 8, 4)
        for strategy, init in STATE_RUNS:
            results[(ci, strategy, init)] = _grads_states(
                lasp, sl(q), sl(k), sl(v), g.narrow(gd, P, n).contiguous(), S0 if init else None, decay, sl(do),
                dF, layout, cu_seqlens=cu, group=dist.group.WORLD, strategy=strategy)
    # misuse: every rank raises the same error
    q1 = torch.randn(1, 2, 3, 4, dtype=F64)
    calls = {
        "batch": lambda: lasp.lasp_attention(*(torch.randn(1 + (rank == world - 1), 2, 3, 4, dtype=F64),) * 3,
                                             cu_seqlens=torch.tensor([0, 3 * world]), group=dist.group.WORLD),
        "differ": lambda: lasp.lasp_attention(q1, q1, q1, group=dist.group.WORLD,
                                              cu_seqlens=torch.tensor([0, 1 + (rank == 0), 3 * world])),
        "total": lambda: lasp.lasp_attention(q1, q1, q1, group=dist.group.WORLD, cu_seqlens=torch.tensor([0, 5])),
        "final": lambda: lasp.lasp_attention(q1, q1, q1, group=dist.group.WORLD, cu_seqlens=torch.tensor([0, 3 * world]),
                                             output_final_state=(rank == 1)),
        "initial": lambda: lasp.lasp_attention(q1, q1, q1, group=dist.group.WORLD, cu_seqlens=torch.tensor([0, 3 * world]),
                                               initial_state=torch.zeros(1, 2, 4, 4, dtype=F64) if rank == 0 else None),
        "state_shape": lambda: lasp.lasp_attention(q1, q1, q1, group=dist.group.WORLD,
                                                   cu_seqlens=torch.tensor([0, 2, 3 * world]),
                                                   initial_state=torch.zeros(2 + (rank == world - 1), 2, 4, 4,
                                                                             dtype=F64)),
        "state_decay": lambda: lasp.lasp_attention(q1, q1, q1, torch.zeros(2 + (rank == 0)), group=dist.group.WORLD,
                                                   cu_seqlens=torch.tensor([0, 3 * world]), output_final_state=True),
        "invalid": lambda: lasp.lasp_attention(q1, q1, q1, group=dist.group.WORLD,
                                               cu_seqlens=torch.tensor([0, 3 * world]) if rank else torch.tensor([2, 3])),
    }
    results["errors"] = record_errors(calls)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_packed_across_ranks_matches_one_rank(lasp, world):
    res = spawn_world(_dist_worker, world, (), SPAWN_DEADLINE_S, f"packed documents (gloo, world={world})")
    for ci, (lens, pieces, layout) in enumerate(DIST[world]):
        N = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
        q, k, v, g, decay, do = _problem(1000 + 10 * world + ci, N, 2, 1, 2, 8, 4, True, layout)
        want = _grads(lasp, q, k, v, g, decay, do, layout, cu_seqlens=cu)
        d, gd = _seq(layout), (2 if layout == "bhnd" else 1)
        for strategy in ("ring", "allgather", "scan"):
            for key in ("o", "dq", "dg"):  # per token: the rank's slice
                got = torch.cat([res[r][(ci, strategy)][key] for r in range(world)], dim=gd if key == "dg" else d)
                torch.testing.assert_close(got, want[key], rtol=1e-10, atol=1e-10,
                                           msg=lambda m: f"case {ci} {strategy} {key}: {m}")
            for key in ("dk", "dv"):
                got = torch.cat([res[r][(ci, strategy)][key] for r in range(world)], dim=d)
                torch.testing.assert_close(got, want[key], rtol=1e-10, atol=1e-10,
                                           msg=lambda m: f"case {ci} {strategy} {key}: {m}")
        # per-document states: outputs and per-token gradients by slice, final states and dS0 summed over the
        # ranks (each rank returns the documents ending in its piece, reads the ones starting in it)
        S0, dF = _states(1000 + 10 * world + ci, len(lens), 2, 8, 4)
        cu_l = cu.tolist()
        P = [sum(pieces[:r]) for r in range(world)]
        owner = lambda pos: next(r for r in range(world) if P[r] <= pos < P[r] + pieces[r])  # noqa: E731
        for strategy, init in STATE_RUNS:
            want = _grads_states(lasp, q, k, v, g, S0 if init else None, decay, do, dF, layout, cu_seqlens=cu)
            runs = [res[r][(ci, strategy, init)] for r in range(world)]
            what = f"case {ci} {strategy} S0={init}"
            for key in ("o", "dq", "dk", "dv", "dg"):
                got = torch.cat([x[key] for x in runs], dim=gd if key == "dg" else d)
                torch.testing.assert_close(got, want[key], rtol=1e-10, atol=1e-10, msg=lambda m: f"{what} {key}: {m}")
            for key in ("final", "dS0") if init else ("final",):
                got = sum(x[key] for x in runs)
                torch.testing.assert_close(got, want[key], rtol=1e-10, atol=1e-10, msg=lambda m: f"{what} {key}: {m}")
            for j in range(len(lens)):
                end_rank = owner(cu_l[j + 1] - 1)
                for r in range(world):
                    if r != end_rank:
                        assert torch.all(runs[r]["final"][j] == 0), (what, "final", j, r)
                    if init and r != owner(cu_l[j]):
                        assert torch.all(runs[r]["dS0"][j] == 0), (what, "dS0", j, r)
    errs = [res[r]["errors"] for r in range(world)]
    expect = {"batch": ("ValueError", "batch size 1"), "differ": ("ValueError", "the same on every rank"),
              "total": ("ValueError", "must equal the packed"),
              "final": ("ValueError", "output_final_state must be the same on every rank"),
              "initial": ("ValueError", "initial_state given (or None) must be the same on every rank"),
              "state_shape": ("ValueError", "initial_state"),
              "invalid": ("ValueError", "cu_seqlens")}
    for name, (typ, text) in expect.items():
        for r in range(world):
            assert errs[r][name] is not None, f"{name}: group rank {r} did not raise"
            assert errs[r][name][0] == typ and text in errs[r][name][1], (name, r, errs[r][name])
    # a bad decay on one rank: that rank raises the op's own error, every other rank names it
    for r in range(world):
        assert errs[r]["state_decay"] is not None, f"state_decay: group rank {r} did not raise"
        assert "group ranks [0]" in errs[r]["state_decay"][1], (r, errs[r]["state_decay"])
    assert "decay must have one rate per output head" in errs[0]["state_decay"][1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_packed_cuda_is_the_gated_call_with_resets(lasp, dtype, seed):
    """On the GPU (bf16: the tensor-core kernels with gates, whose resets test_gates_cuda checks against the
    float64 recurrence): a packed call is exactly the call with -inf gates at the document starts, except
    that the given g there gets a zero gradient. dg sums some terms with atomics (their order differs from
    run to run): it must differ from the reset call's dg by no more than that one differs from float64, or
    than float32's tolerance of the suite (1e-4), whichever is larger."""
    lens = [700, 1, 64, 2000, 63, 1]
    N = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, g, decay, do = _problem(seed, N, 4, 2, 2, 128, 64, True, "bhnd")
    dev = [t.to("cuda", dtype) for t in (q, k, v)]
    gc, dc, doc = g.to("cuda", torch.float32), decay.cuda(), do.to("cuda", dtype)
    got = _grads(lasp, *dev, gc, dc, doc, "bhnd", cu_seqlens=cu.cuda())
    starts = cu[:-1].long()
    g_reset = gc.clone()
    g_reset[:, :, starts] = float("-inf")
    want = _grads(lasp, *dev, g_reset, dc, doc, "bhnd")
    want["dg"][:, :, starts] = 0
    for key in ("o", "dq", "dk", "dv"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    # the float64 reset call on the CPU, from the same rounded inputs
    g64 = g_reset.double().cpu()
    exact = _grads(lasp, *(t.double().cpu() for t in dev), g64, decay, doc.double().cpu(), "bhnd")["dg"]
    exact[:, :, starts] = 0
    rel = lambda a, b: (torch.linalg.vector_norm(a.double().cpu() - b.double().cpu())  # noqa: E731
                        / torch.linalg.vector_norm(b.double().cpu())).item()
    own, apart = rel(want["dg"], exact), rel(got["dg"], want["dg"])
    assert own < 5e-2, f"dg of the reset call: relative error {own:.2e} against float64"
    assert apart <= max(own, 1e-4), (f"dg: packed vs reset call differ by {apart:.2e} (relative), more than the "
                                      f"call's own error {own:.2e} and 1e-4")


CUDA_DOC_CASES = [
    # (doc lengths, Hq, Hk, Hv, D, E): long rows (cut into segments on one GPU), documents of one token,
    # starts on and beside chunk edges (64), head maps
    ([700, 1, 64, 2000, 63, 1, 1267], 4, 2, 2, 128, 64),
    ([64, 128, 1, 1, 3000, 1], 2, 2, 2, 64, 128),
    ([129, 4000, 5, 900], 1, 1, 4, 128, 64),   # GVA (Mamba-2-like shared q, k)
    ([4096], 2, 2, 2, 64, 64),                 # one document: the plain call
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", CUDA_DOC_CASES, ids=[f"docs{len(c[0])}-q{c[1]}k{c[2]}v{c[3]}-d{c[4]}e{c[5]}"
                                                      for c in CUDA_DOC_CASES])
@pytest.mark.parametrize("as_resets", ["0", "1"], ids=["starts-as-gates", "starts-as-resets"])
def test_packed_cuda_without_gates_matches_float64(lasp, case, dtype, as_resets, seed, monkeypatch):
    """Packed documents without g on the GPU, the starts run as -inf gates (default) or as such
    (LASP_DOC_STARTS=1: on sm_90, bf16 / fp16, the tensor-core kernels' gate mode 2, the powers of gamma cut
    at the starts), against the float64 packed call on the CPU (itself checked against each document alone
    above), from the same rounded inputs: o, dq, dk, dv within the error of the gated call with -inf at the
    starts on the same GPU, and within a relative bound of the dtype."""
    monkeypatch.setenv("LASP_DOC_STARTS", as_resets)
    lens, Hq, Hk, Hv, D, E = case
    N = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, _, decay, do = _problem(seed, N, Hq, Hk, Hv, D, E, False, "bhnd")
    dev = [t.to("cuda", dtype) for t in (q, k, v)]
    dc, doc = decay.cuda(), do.to("cuda", dtype)
    got = _grads(lasp, *dev, None, dc, doc, "bhnd", cu_seqlens=cu.cuda())
    H = max(Hq, Hv)
    g_reset = torch.zeros(1, H, N, device="cuda")
    g_reset[:, :, cu[:-1].long()] = float("-inf")
    gated = _grads(lasp, *dev, g_reset, dc, doc, "bhnd")
    exact = _grads(lasp, *(t.double().cpu() for t in dev), None, decay, doc.double().cpu(), "bhnd",
                   cu_seqlens=cu)
    rel = lambda a, b: (torch.linalg.vector_norm(a.double().cpu() - b.double().cpu())  # noqa: E731
                        / torch.linalg.vector_norm(b.double().cpu())).item()
    bound = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    for key in ("o", "dq", "dk", "dv"):
        mine, theirs = rel(got[key], exact[key]), rel(gated[key], exact[key])
        assert mine <= max(1.5 * theirs, bound / 4), (f"{key}: relative error {mine:.2e} against float64, the gated "
                                                      f"call with -inf starts has {theirs:.2e}")
        assert mine < bound, f"{key}: relative error {mine:.2e} against float64 (bound {bound:.0e})"
