"""The LASP ring (and the LASP-2 all-gather strategy) across real processes: lasp_attention(group=...) on each rank's piece equals the
single-process op on the whole sequence and the fp64 reference, outputs and all gradients.

One spawn per (backend, world size) runs several cases; each rank saves what it computed to a
file and the parent process does every comparison (so a failure names the case, rank and
quantity). A child that raises fails the test with its traceback; a hang fails at a deadline.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from conftest import (
    acc_dtype,
    assert_close_to_ref,
    gen,
    import_lasp,
    make_decay,
    randn,
    ref,
    rel_err,
    spawn_once,
    spawn_world,
)

F32, F64 = torch.float32, torch.float64
STRATEGIES = ("ring", "allgather", "scan")  # LASP ring, the LASP-2 all-gather, the recursive-doubling scan
# On NCCL the ring also over each transport named (lasp.set_ring_transport); plain "ring" uses the
# default ("auto": the peer transport on one node)
NCCL_STRATEGIES = STRATEGIES + ("ring/nccl", "ring/peer")
SPAWN_DEADLINE_S = 180  # whole spawn (startup + all cases); a hang fails the test after this
PG_TIMEOUT_S = 90

# Each case: the sequence of one problem is split into `pieces` (lengths, one per group rank).
# groups: None -> dist.group.WORLD; else a list of rank lists, one independent problem per group
#   (created with dist.new_group on every rank).
# state: None (no initial state), "rank0" (only group rank 0 passes it), "all" (every rank passes
#   the same tensor; only rank 0's is read, the others must get a zero gradient).
# final_grads: "none", "last" (cotangent only on the last rank's final_state), "all" (every rank's).
CASES = {
    2: [
        dict(dtype=F32, B=2, H=4, Hkv=2, D=8, E=12, pieces=[7, 9], decay="alibi", state="rank0", final_grads="last", layout="bhnd"),
        dict(dtype=F64, B=1, H=2, Hkv=1, D=4, E=6, pieces=[1, 12], decay="mixed", state="all", final_grads="all", layout="bnhd"),
        dict(dtype=F32, B=1, H=2, Hkv=2, D=8, E=8, pieces=[65, 64], decay=None, state=None, final_grads="none", layout="bhnd"),
        # head dims whose last CUDA column tile is partial (E = 80, 96 with tiles of 64), several chunks per piece
        dict(dtype=F32, B=1, H=2, Hkv=1, D=96, E=80, pieces=[150, 70], decay="alibi", state="rank0", final_grads="all", layout="bhnd"),
    ],
    3: [
        dict(dtype=F32, B=2, H=4, Hkv=1, D=8, E=4, pieces=[5, 5, 5], decay="strong", state="rank0", final_grads="all", layout="bhnd"),
        dict(dtype=F64, B=1, H=4, Hkv=2, D=5, E=7, pieces=[1, 9, 3], decay="alibi", state="all", final_grads="last", layout="bnhd"),
        dict(dtype=F32, B=1, H=2, Hkv=1, D=6, E=6, pieces=[20, 1, 30], decay=None, state="rank0", final_grads="all", layout="bhnd"),
        dict(dtype=F32, B=1, H=2, Hkv=2, D=17, E=160, pieces=[1, 130, 97], decay="alibi", state="rank0", final_grads="last", layout="bnhd"),
        dict(dtype=F64, B=1, H=2, Hkv=1, D=131, E=96, pieces=[70, 0, 129], decay="mixed", state="all", final_grads="all", layout="bhnd"),
    ],
    4: [
        dict(dtype=F32, B=2, H=4, Hkv=2, D=8, E=12, pieces=[5, 1, 9, 3], decay="alibi", state="rank0", final_grads="all", layout="bhnd"),
        dict(dtype=F64, B=1, H=2, Hkv=2, D=4, E=3, pieces=[4, 4, 4, 4], decay=None, state="all", final_grads="last", layout="bnhd"),
        dict(dtype=F32, B=1, H=4, Hkv=1, D=6, E=8, pieces=[3, 8, 1], decay="mixed", state="rank0", final_grads="all", layout="bhnd", groups=[[1, 2, 3]]),
        dict(dtype=F64, B=2, H=2, Hkv=1, D=4, E=5, pieces=[6, 2], decay="alibi", state="all", final_grads="all", layout="bhnd", groups=[[0, 1], [2, 3]]),
    ],
}


def case_for(world, ci, backend):
    """The case as run on `backend`: the CUDA kernels have no float64, so nccl runs those in float32."""
    case = dict(CASES[world][ci])
    if backend == "nccl" and case["dtype"] == F64:
        case["dtype"] = F32
    return case


def _seed(world, ci, gi):
    return 4242 + 1000 * world + 37 * ci + 7 * gi


def _seq_dim(layout):
    return 2 if layout == "bhnd" else 1


def _slice(x, a, b, layout):
    return x.narrow(_seq_dim(layout), a, b - a)


def make_problem(case, seed):
    """Full-sequence inputs (CPU), identical in every process."""
    g = gen(seed)
    B, H, Hkv, D, E = case["B"], case["H"], case["Hkv"], case["D"], case["E"]
    N = sum(case["pieces"])
    dt = case["dtype"]
    if case["layout"] == "bhnd":
        shapes = [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E), (B, H, N, E)]
    else:
        shapes = [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, E), (B, N, H, E)]
    q, k, v, do = (randn(s, g, dt) for s in shapes)
    s0 = randn((B, H, D, E), g, acc_dtype(dt)) if case["state"] else None
    decay = make_decay(case["decay"], H, g=g)
    W = len(case["pieces"])
    dS = [randn((B, H, D, E), g, acc_dtype(dt)) for _ in range(W)]
    if case["final_grads"] == "none":
        dS = [None] * W
    elif case["final_grads"] == "last":
        dS = [None] * (W - 1) + [dS[-1]]
    return dict(q=q, k=k, v=v, do=do, s0=s0, decay=decay, dS=dS)


def _offsets(pieces):
    out, p = [], 0
    for n in pieces:
        out.append(p)
        p += n
    return out


# ----------------------------------------------------------------------------------------------
# Child process


def _worker(rank, world, port, backend, out_dir):
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    lasp = import_lasp()
    results = {}
    for ci in range(len(CASES[world])):
        case = case_for(world, ci, backend)
        if case.get("groups") is None:
            pgs = [(list(range(world)), dist.group.WORLD)]
        else:
            pgs = [(ranks, dist.new_group(ranks)) for ranks in case["groups"]]  # all ranks call new_group
        for gi, (ranks, pg) in enumerate(pgs):
            if rank not in ranks:
                continue
            r = ranks.index(rank)
            prob = make_problem(case, _seed(world, ci, gi))
            P, n, layout = _offsets(case["pieces"])[r], case["pieces"][r], case["layout"]
            q, k, v, do = (_slice(prob[x], P, P + n, layout).clone().to(device) for x in ("q", "k", "v", "do"))
            for t in (q, k, v):
                t.requires_grad_(True)
            s0 = None
            if prob["s0"] is not None and (r == 0 or case["state"] == "all"):
                s0 = prob["s0"].clone().to(device).requires_grad_(True)
            decay = None if prob["decay"] is None else prob["decay"].to(device)
            for strategy in NCCL_STRATEGIES if backend == "nccl" else STRATEGIES:
                lasp.set_ring_transport(strategy.split("/")[1] if "/" in strategy else "auto")
                o, f = lasp.lasp_attention(
                    q, k, v, decay, group=pg, initial_state=s0, output_final_state=True, layout=layout,
                    strategy=strategy.split("/")[0],
                )
                dS = prob["dS"][r]
                outs, gos = [o], [do]
                if dS is not None:
                    outs.append(f)
                    gos.append(dS.to(device))
                ins = [q, k, v] + ([s0] if s0 is not None else [])
                gr = torch.autograd.grad(outs, ins, gos, allow_unused=True)
                lasp.set_ring_transport("auto")
                results[(ci, gi, r, strategy)] = _pack(o, f, gr, s0)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _pack(o, f, gr, s0):
    def cpu(t):
        return None if t is None else t.detach().cpu()

    return dict(
        o=cpu(o), f=cpu(f), dq=cpu(gr[0]), dk=cpu(gr[1]), dv=cpu(gr[2]),
        ds0=cpu(gr[3]) if s0 is not None else "not passed",
        o_dtype=o.dtype, f_dtype=f.dtype, o_shape=tuple(o.shape),
    )



def run_world(world, backend):
    """Spawn `world` processes once per (backend, world); return {(case, group, grank): results}."""
    merged = {}
    for res in spawn_once(_worker, world, SPAWN_DEADLINE_S, f"distributed test ({backend}, world={world})",
                          (backend,)):
        merged.update(res)
    return merged


# ----------------------------------------------------------------------------------------------
# Expected values (parent process)


def expected(lasp, case, seed):
    """fp64 reference and single-process op for the same loss the ranks back-propagate:
    sum_r <o_r, do_r> + sum_r <final_state_r, dS_r>, final_state_r = state after piece r."""
    prob = make_problem(case, seed)
    layout, pieces = case["layout"], case["pieces"]
    ends = [P + n for P, n in zip(_offsets(pieces), pieces)]
    out = {}
    for kind in ("ref", "op"):
        dt = F64 if kind == "ref" else case["dtype"]
        q, k, v = (prob[x].to(dt).requires_grad_(True) for x in ("q", "k", "v"))
        s0 = None if prob["s0"] is None else prob["s0"].to(acc_dtype(dt)).requires_grad_(True)

        def call(a, b, _q=q, _k=k, _v=v, _s0=s0, _kind=kind):
            qs, ks, vs = (_slice(t, a, b, layout) for t in (_q, _k, _v))
            if _kind == "ref":
                return ref.attention_ref(qs, ks, vs, prob["decay"], None, _s0, layout)
            return lasp.lasp_attention(qs, ks, vs, prob["decay"], initial_state=_s0,
                                       output_final_state=True, layout=layout)

        o, _ = call(0, ends[-1])
        finals = [call(0, e)[1] for e in ends]  # state after each piece (prefix runs)
        loss = (o * prob["do"].to(o.dtype)).sum()
        for f, dS in zip(finals, prob["dS"]):
            if dS is not None:
                loss = loss + (f * dS.to(f.dtype)).sum()
        ins = [q, k, v] + ([s0] if s0 is not None else [])
        gr = torch.autograd.grad(loss, ins)
        out[kind] = dict(o=o.detach(), finals=[f.detach() for f in finals],
                         dq=gr[0], dk=gr[1], dv=gr[2], ds0=gr[3] if s0 is not None else None)
    return out


_EXPECTED = {}


def check_case(lasp, results, world, ci, backend, strategy):
    case = case_for(world, ci, backend)
    dt = case["dtype"]
    tol_sp = 1e-5 if dt == F32 else 1e-12  # distributed vs single-process op (same dtype)
    groups = case.get("groups") or [list(range(world))]
    for gi, ranks in enumerate(groups):
        key = (world, ci, gi, backend)
        if key not in _EXPECTED:
            _EXPECTED[key] = expected(lasp, case, _seed(world, ci, gi))
        exp = _EXPECTED[key]
        for r, (P, n) in enumerate(zip(_offsets(case["pieces"]), case["pieces"])):
            got = results[(ci, gi, r, strategy)]
            where = f"{strategy}: case {ci} group {ranks} group-rank {r} (global {ranks[r]}), piece [{P}, {P + n})"
            assert got["o_dtype"] == dt and got["f_dtype"] == acc_dtype(dt), where
            sl = lambda t: _slice(t, P, P + n, case["layout"])  # noqa: E731
            pairs = [
                ("o", got["o"], sl(exp["ref"]["o"]), sl(exp["op"]["o"])),
                ("final_state", got["f"], exp["ref"]["finals"][r], exp["op"]["finals"][r]),
                ("dq", got["dq"], sl(exp["ref"]["dq"]), sl(exp["op"]["dq"])),
                ("dk", got["dk"], sl(exp["ref"]["dk"]), sl(exp["op"]["dk"])),
                ("dv", got["dv"], sl(exp["ref"]["dv"]), sl(exp["op"]["dv"])),
            ]
            if case["state"] is not None and r == 0:
                pairs.append(("d_initial_state", got["ds0"], exp["ref"]["ds0"], exp["op"]["ds0"]))
            for name, a, want_ref, want_op in pairs:
                assert a is not None, f"{where}: {name} is None"
                assert_close_to_ref(f"{where}: {name} vs fp64 reference", a, want_ref, dt)
                e = rel_err(a, want_op)
                assert e < tol_sp, f"{where}: {name} vs single-process op: rel err {e:.3e} >= {tol_sp:.0e}"
            if case["state"] == "all" and r > 0:
                ds0 = got["ds0"]
                assert ds0 is None or torch.count_nonzero(ds0) == 0, (
                    f"{where}: initial_state passed on a rank > 0 must get a zero gradient"
                )


def _params(backend_marks=()):
    return [
        pytest.param(w, ci, id=f"w{w}-c{ci}", marks=list(backend_marks))
        for w in sorted(CASES)
        for ci in range(len(CASES[w]))
    ]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world,ci", _params())
def test_ring_gloo(lasp, world, ci, strategy):
    results = run_world(world, "gloo")
    check_case(lasp, results, world, ci, "gloo", strategy)


_NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("strategy", NCCL_STRATEGIES)
@pytest.mark.parametrize("world,ci", _params())
def test_ring_nccl(lasp, world, ci, strategy):
    if _NGPU < world:
        pytest.skip(f"needs {world} CUDA devices for nccl, found {_NGPU}")
    if not dist.is_nccl_available():
        pytest.skip("nccl not available")
    results = run_world(world, "nccl")
    check_case(lasp, results, world, ci, "nccl", strategy)


# ----------------------------------------------------------------------------------------------
# The peer transport under load: many calls back to back with no host synchronisation, two state
# sizes (two sets of inboxes), forward and backward interleaved as in a layer stack. Each rank runs
# the same stack over the peer transport and over NCCL; both are compared with the stack run in
# float64 on the CPU over the whole sequence, and the peer transport must be as accurate as NCCL.

STACK_SHAPES = [(2, 4, 32, 32), (1, 8, 64, 16)]  # (B, H, D, E): two state sizes, alternating per layer
STACK_LAYERS = 6


def _stack_pieces(world):
    return [100 + 37 * r for r in range(world)]  # uneven


def _stack_inputs(world, lasp):
    g = torch.Generator().manual_seed(1234)
    n = sum(_stack_pieces(world))
    xs = [torch.randn(B, H, n, D, generator=g) for (B, H, D, E) in STACK_SHAPES]
    ws = [torch.randn(D, E, generator=g) / D**0.5 for (B, H, D, E) in STACK_SHAPES]
    decay = [lasp.alibi_slopes(H) for (B, H, D, E) in STACK_SHAPES]
    return xs, ws, decay


def _stack(lasp, xs, ws, decay, group, bounds):
    """The layer stack on (pieces of) xs; loss = sum over layers and pieces of mean(h^2) over the piece."""
    x = [t.clone().requires_grad_(True) for t in xs]
    h = list(x)
    loss = 0
    for layer in range(STACK_LAYERS):
        i = layer % 2
        o = lasp.lasp_attention(h[i], h[i], h[i] @ ws[i], decay[i] if layer % 3 else None, group=group)
        h[i] = torch.tanh(o @ ws[i].T) + h[i]
        for a, b in bounds:
            loss = loss + h[i][:, :, a:b].pow(2).mean()
    loss.backward()
    return [h[0].detach().cpu(), h[1].detach().cpu()] + [t.grad.cpu() for t in x]


def _stack_worker(rank, world, port, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S), device_id=torch.device("cuda", rank))
    lasp = import_lasp()
    dev = torch.device("cuda", rank)
    xs, ws, decay = _stack_inputs(world, lasp)
    a = sum(_stack_pieces(world)[:rank])
    b = a + _stack_pieces(world)[rank]
    xs = [t[:, :, a:b].to(dev) for t in xs]
    ws = [t.to(dev) for t in ws]
    decay = [t.to(dev) for t in decay]
    out = {}
    for transport in ("peer", "nccl"):
        lasp.set_ring_transport(transport)
        for it in range(3):
            out[(transport, it)] = _stack(lasp, xs, ws, decay, dist.group.WORLD, [(0, b - a)])
    lasp.set_ring_transport("auto")
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_peer_transport_layer_stack(lasp, world):
    if _NGPU < world:
        pytest.skip(f"needs {world} CUDA devices for the peer transport, found {_NGPU}")
    results = spawn_world(_stack_worker, world, (), SPAWN_DEADLINE_S, f"peer layer stack (world={world})")
    xs, ws, decay = _stack_inputs(world, lasp)
    pieces = _stack_pieces(world)
    bounds = [(sum(pieces[:r]), sum(pieces[:r + 1])) for r in range(world)]
    want = _stack(lasp, [t.double() for t in xs], [t.double() for t in ws], decay, None, bounds)
    names = ["h0", "h1", "grad x0", "grad x1"]
    for r, res in enumerate(results):
        a, b = bounds[r]
        for it in range(3):
            for j, name in enumerate(names):
                ref_t = want[j][:, :, a:b]
                peer, nccl = res[("peer", it)][j].double(), res[("nccl", it)][j].double()
                assert torch.isfinite(peer).all(), f"rank {r} iteration {it} {name}: non-finite over peer"
                e_peer, e_nccl = rel_err(peer, ref_t), rel_err(nccl, ref_t)
                assert e_peer <= 2 * e_nccl + 1e-6, (
                    f"rank {r} iteration {it} {name}: peer rel err {e_peer:.3e} vs float64, nccl {e_nccl:.3e}")


# ----------------------------------------------------------------------------------------------
# The scan strategy past four ranks (its rounds of distance 4; a world that is no power of two), in one
# level and over nodes (env LASP_NODE_SIZE: nodes of 2 and 3 consecutive ranks, the last one partial; the
# scan runs within nodes, across them, then within again): every output and gradient of each rank's piece
# equals the one-rank call's slice, in float64, with per-token gates or decay alone, an initial state and
# final-state cotangents on every rank, uneven and empty pieces.

SCAN_WORLDS = {5: [3, 0, 17, 1, 9], 8: [4, 1, 6, 0, 9, 2, 5, 3]}
SCAN_CONFIGS = [("gates", True), ("decay", False)]  # (decay or gates, initial state)
SCAN_NODES = [None, 2, 3]  # LASP_NODE_SIZE (None: one node)


def _scan_problem(world, gates, with_state):
    g_ = gen(9000 + world)
    B, H, Hkv, D, E = 2, 4, 2, 5, 3
    N = sum(SCAN_WORLDS[world])
    q, k = randn((B, H, N, D), g_, F64), randn((B, Hkv, N, D), g_, F64)
    v, do = randn((B, Hkv, N, E), g_, F64), randn((B, H, N, E), g_, F64)
    decay = make_decay("alibi", H)
    g = -torch.nn.functional.softplus(randn((B, H, N), g_, F64)) if gates else None
    s0 = randn((B, H, D, E), g_, F64) if with_state else None
    dF = randn((B, H, D, E), g_, F64)
    return q, k, v, do, decay, g, s0, dF


def _scan_call(lasp, q, k, v, do, decay, g, s0, dF, group, strategy):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gl = None if g is None else g.detach().clone().requires_grad_()
    sl = None if s0 is None else s0.detach().clone().requires_grad_()
    o, f = lasp.lasp_attention(*leaves, decay, g=gl, initial_state=sl, output_final_state=True, group=group,
                               strategy=strategy)
    ins = leaves + [x for x in (gl, sl) if x is not None]
    gr = torch.autograd.grad((o, f), ins, (do, dF))
    out = dict(o=o.detach(), f=f.detach(), dq=gr[0], dk=gr[1], dv=gr[2])
    if gl is not None:
        out["dg"] = gr[3]
    if sl is not None:
        out["ds0"] = gr[-1]
    return out


def _scan_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    lasp = import_lasp()
    pieces = SCAN_WORLDS[world]
    P, n = sum(pieces[:rank]), pieces[rank]
    results = {}
    for nodes in SCAN_NODES:
        if nodes is None:
            os.environ.pop("LASP_NODE_SIZE", None)
        else:
            os.environ["LASP_NODE_SIZE"] = str(nodes)
        q0 = torch.zeros(1, 1, 1, 1, dtype=F64)
        results[("resolved", nodes)] = lasp.distributed._resolve_strategy(
            "test", "scan", dist.group.WORLD, q0, q0, gates=False, op="lasp_attention")
        for gates, with_state in SCAN_CONFIGS:
            q, k, v, do, decay, g, s0, dF = _scan_problem(world, gates == "gates", with_state)
            cut = lambda t: t.narrow(-2 if t.dim() == 4 else -1, P, n).contiguous()  # noqa: E731
            # every rank passes the cotangent of its own returned state (the last rank's is the sequence's)
            results[(gates, with_state, nodes)] = _scan_call(lasp, cut(q), cut(k), cut(v), cut(do), decay,
                                                             None if g is None else cut(g), s0, dF,
                                                             dist.group.WORLD, "scan")
    os.environ.pop("LASP_NODE_SIZE", None)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
@pytest.mark.parametrize("world", sorted(SCAN_WORLDS))
def test_scan_gloo_larger_worlds(lasp, world):
    res = spawn_world(_scan_worker, world, (), SPAWN_DEADLINE_S, f"the scan strategy (gloo, world={world})")
    pieces = SCAN_WORLDS[world]
    starts = [sum(pieces[:r]) for r in range(world)]
    for r in range(world):
        assert [res[r][("resolved", nodes)] for nodes in SCAN_NODES] == ["scan", "scan:2", "scan:3"], r
    for (gates, with_state), nodes in [(c, nd) for c in SCAN_CONFIGS for nd in SCAN_NODES]:
        q, k, v, do, decay, g, s0, dF = _scan_problem(world, gates == "gates", with_state)
        what = f"world {world}, {gates}, initial state {with_state}, nodes of {nodes}"
        # the one-rank reference: the final-state cotangents of every rank's returned state, each applied to
        # the state after that rank's piece: the sum of the one-rank calls cut at each piece's end
        o_ref = _scan_call(lasp, q, k, v, do, decay, g, s0, torch.zeros_like(dF), None, "ring")
        totals = {key: val.clone() for key, val in o_ref.items()}
        for r in range(world):
            end = starts[r] + pieces[r]
            cut = lambda t: t.narrow(-2 if t.dim() == 4 else -1, 0, end)  # noqa: E731
            part = _scan_call(lasp, cut(q), cut(k), cut(v), torch.zeros_like(cut(do)), decay,
                              None if g is None else cut(g), s0, dF, None, "ring")
            for key in ("dq", "dk", "dv", "dg"):
                if key in part:
                    totals[key].narrow(-2 if totals[key].dim() == 4 else -1, 0, end).add_(part[key])
            if "ds0" in part:
                totals["ds0"] += part["ds0"]
            torch.testing.assert_close(res[r][(gates, with_state, nodes)]["f"], part["f"], rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{what} rank {r} final state: {m}")
        for key in ("o", "dq", "dk", "dv", "dg"):
            if key not in totals:
                continue
            dim = -2 if totals[key].dim() == 4 else -1
            got = torch.cat([res[r][(gates, with_state, nodes)][key] for r in range(world)], dim=dim)
            torch.testing.assert_close(got, totals[key], rtol=1e-10, atol=1e-10, msg=lambda m: f"{what} {key}: {m}")
        if with_state:
            got = sum(res[r][(gates, with_state, nodes)]["ds0"] for r in range(world))
            torch.testing.assert_close(got, totals["ds0"], rtol=1e-10, atol=1e-10, msg=lambda m: f"{what} ds0: {m}")
