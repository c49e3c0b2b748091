"""lasp.distributed: the dp x sp DeviceMesh, the sequence split / gather, and lasp_attention on a mesh.

One spawn of 4 gloo processes (each pays seconds of imports on a small CPU box) runs every case and
saves what it computed; the parent process does every comparison, so a failure names the case, rank
and quantity:

* init_mesh: dp=2 x sp=2 (consecutive ranks share a sequence), sp=4, dp=4 x sp=1; group memberships.
* split_sequence / gather_sequence round trips with uneven and empty pieces, token dim 1, 2 and -2,
  over WORLD (4 ranks) and over the sp groups (2 ranks), with and without given sizes.
* gather_sequence's gradient (the adjoint: the sum over ranks of the output gradients, sliced)
  against the same loss computed in one process, float64.
* lasp_attention on the dp=2 x sp=2 mesh: each dp replica its own batch, the sequence split over
  sp; outputs and q/k/v gradients equal to the single-process op on the whole sequence and to the
  float64 reference, for strategy "ring" and "allgather", GQA / MQA, decay on and off, an empty piece;
  and gathered back with gather_sequence (both sp ranks then back-propagate the whole sequence's loss,
  so the gradients are twice the single-process ones).
* errors: arguments that do not factor the world, a non-member group, ranks that disagree on shapes.

The same worker runs on NCCL (4 GPUs) in test_dp2_sp2_nccl, which skips with its reason elsewhere.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from conftest import assert_close_to_ref, gen, import_lasp, make_decay, randn, ref, rel_err, spawn_world

F32, F64 = torch.float32, torch.float64
WORLD, SP = 4, 2  # dp = 2
SPAWN_DEADLINE_S = 150  # whole spawn (imports + every case); a hang fails the tests after this
PG_TIMEOUT_S = 60
STRATEGIES = ("ring", "allgather")
TOL_SP = {F32: 1e-5, F64: 1e-12}  # distributed vs single-process op in the same dtype (as test_distributed)

# Round trips: (token dim, full shape with N at that dim) for each N.
ROUND_TRIP_N = (0, 1, 3, 10)
ROUND_TRIP_DIMS = {1: lambda n: (2, n, 3), 2: lambda n: (2, 3, n, 4), -2: lambda n: (2, 3, n, 4)}

# lasp_attention on the mesh: one problem per dp replica (seed + replica), sequence split over sp.
ATTN_CASES = [
    dict(layout="bhnd", B=2, H=4, Hkv=2, D=8, E=6, N=13, decay="alibi"),  # GQA, odd split 7 / 6
    dict(layout="bnhd", B=1, H=4, Hkv=1, D=4, E=8, N=1, decay="mixed"),  # MQA, sp rank 1 empty
    dict(layout="bhnd", B=1, H=2, Hkv=2, D=16, E=16, N=130, decay=None),  # no decay, > 2 chunks
]


def _tok_dim(layout):
    return 2 if layout == "bhnd" else 1


def attn_problem(ci, replica):
    """Full-sequence fp32 inputs of case ci for dp replica `replica` (identical in every process)."""
    c = ATTN_CASES[ci]
    g = gen(9100 + 31 * ci + replica)
    B, H, Hkv, D, E, N = c["B"], c["H"], c["Hkv"], c["D"], c["E"], c["N"]
    if c["layout"] == "bhnd":
        shapes = [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E), (B, H, N, E)]
    else:
        shapes = [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, E), (B, N, H, E)]
    q, k, v, do = (randn(s, g, F32) for s in shapes)
    return dict(q=q, k=k, v=v, do=do, decay=make_decay(c["decay"], H, g=g))


def round_trip_input(dim, n):
    return randn(ROUND_TRIP_DIMS[dim](n), gen(500 + 10 * n + dim), F64)


def grad_problem(n, rank):
    """x (shared) and this rank's loss weights w_rank for the gather gradient check."""
    x = randn((2, n, 3), gen(700 + n), F64)
    w = randn((2, n, 3), gen(800 + 13 * n + rank), F64)
    return x, w


GRAD_N = (7, 3)  # 3 over 4 ranks: an empty piece


# ----------------------------------------------------------------------------------------------
# Child process


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded and checked by the parent
        return (type(e).__name__, str(e))
    return None


def _worker(rank, world, port, backend, out_dir):
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    torch.set_num_threads(1)
    lasp = import_lasp()
    D = lasp.distributed
    res = {}

    # -- meshes
    def mesh_info(mesh):
        sp, dp = D.sp_group(mesh), D.dp_group(mesh)
        return dict(names=tuple(mesh.mesh_dim_names), shape=tuple(mesh.mesh.shape), device_type=mesh.device_type,
                    sp_ranks=dist.get_process_group_ranks(sp), dp_ranks=dist.get_process_group_ranks(dp),
                    sp_rank=dist.get_rank(sp), dp_rank=dist.get_rank(dp))

    mesh = D.init_mesh(sp=SP)
    res["mesh"] = {"dp2xsp2": mesh_info(mesh), "sp4": mesh_info(D.init_mesh(sp=4)),
                   "dp4xsp1": mesh_info(D.init_mesh(sp=1, dp=4))}
    sp = D.sp_group(mesh)

    # -- round trips over WORLD and over the sp groups
    rt = {}
    for gname, grp in (("world", dist.group.WORLD), ("sp", sp)):
        W, r = dist.get_world_size(grp), dist.get_rank(grp)
        for dim in ROUND_TRIP_DIMS:
            for n in ROUND_TRIP_N:
                x = round_trip_input(dim, n).to(device)
                piece = D.split_sequence(x, grp, dim=dim)
                d = dim % x.dim()
                sizes = [D.shard_bounds(n, W, i)[1] - D.shard_bounds(n, W, i)[0] for i in range(W)]
                shares = piece.numel() > 0 and piece.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                rt[(gname, dim, n)] = dict(
                    piece=piece.cpu(), contiguous=piece.is_contiguous(), shares_storage=shares,
                    back=D.gather_sequence(piece, grp, dim=dim).cpu(),
                    back_sizes=D.gather_sequence(piece, grp, dim=dim, sizes=sizes).cpu(),
                    d=d,
                )
    res["round_trip"] = rt
    res["none_group_identity"] = D.split_sequence(torch.ones(1), None) is not None

    # -- gather's gradient: loss_rank = <sin(gather(x_rank)), w_rank>, summed over the group's ranks
    gg = {}
    for gname, grp in (("world", dist.group.WORLD), ("sp", sp)):
        for n in GRAD_N:
            x, w = grad_problem(n, rank)
            xl = D.split_sequence(x.to(device), grp).detach().requires_grad_(True)
            y = D.gather_sequence(xl, grp)
            (gx,) = torch.autograd.grad((torch.sin(y) * w.to(device)).sum(), xl)
            gg[(gname, n)] = dict(y=y.detach().cpu(), grad=gx.cpu(), group_ranks=dist.get_process_group_ranks(grp))
    res["gather_grad"] = gg

    # -- lasp_attention on the dp=2 x sp=2 mesh
    dp_rank = dist.get_rank(D.dp_group(mesh))
    at = {}
    for ci, c in enumerate(ATTN_CASES):
        prob = attn_problem(ci, dp_rank)
        t = _tok_dim(c["layout"])
        ql, kl, vl, dol = (D.split_sequence(prob[n].to(device), sp, dim=t) for n in ("q", "k", "v", "do"))
        for x in (ql, kl, vl):
            x.requires_grad_(True)
        decay = None if prob["decay"] is None else prob["decay"].to(device)
        for strategy in STRATEGIES:
            o = lasp.lasp_attention(ql, kl, vl, decay, group=sp, layout=c["layout"], strategy=strategy)
            gq, gk, gv = torch.autograd.grad(o, (ql, kl, vl), dol)
            at[(ci, strategy)] = dict(o=o.detach().cpu(), dq=gq.cpu(), dk=gk.cpu(), dv=gv.cpu())
        # gathered back: every sp rank back-propagates <o_full, do_full> (the whole sequence's loss)
        o = lasp.lasp_attention(ql, kl, vl, decay, group=sp, layout=c["layout"])
        o_full = D.gather_sequence(o, sp, dim=t)
        gq, gk, gv = torch.autograd.grad(o_full, (ql, kl, vl), prob["do"].to(device))
        at[(ci, "gathered")] = dict(o=o_full.detach().cpu(), dq=gq.cpu(), dk=gk.cpu(), dv=gv.cpu())
    res["attn"] = at
    res["dp_rank"], res["sp_rank"] = dp_rank, dist.get_rank(sp)

    # -- errors (each raised on every rank that calls, before or by the same collective)
    x = torch.randn(2, 5, 3, device=device)
    errs = {
        "sp_not_divisor": _catch(lambda: D.init_mesh(sp=3)),
        "dp_mismatch": _catch(lambda: D.init_mesh(sp=2, dp=3)),
        "sp_zero": _catch(lambda: D.init_mesh(sp=0)),
        "sp_str": _catch(lambda: D.init_mesh(sp="2")),
        "sizes_len": _catch(lambda: D.gather_sequence(x, sp, sizes=[5])),
        "sizes_mine": _catch(lambda: D.gather_sequence(x, sp, sizes=[4, 4])),
        "dim_range": _catch(lambda: D.split_sequence(x, sp, dim=3)),
        "group_type": _catch(lambda: D.split_sequence(x, "sp")),
        "sp_group_no_dim": _catch(lambda: D.sp_group(mesh["dp"])),
        # ranks disagree on a non-sequence size (rank 3) and on dtype (rank 1): all raise
        "shape_mismatch": _catch(lambda: D.gather_sequence(
            torch.zeros(2, rank + 1, 4 if rank == 3 else 3, device=device), dist.group.WORLD)),
        "dtype_mismatch": _catch(lambda: D.gather_sequence(
            torch.zeros(2, 1, 3, device=device, dtype=F64 if rank == 1 else F32), dist.group.WORLD)),
    }
    g01 = dist.new_group([0, 1])  # every rank calls new_group; ranks 2, 3 are not members
    errs["non_member"] = _catch(lambda: D.split_sequence(x, g01)) if rank >= 2 else "member"
    res["errors"] = errs

    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()



_SPAWNED = {}


def _spawn(backend):
    """Run the workers once per backend; a failure is re-raised by every test that needs them."""
    if (backend, "error") in _SPAWNED:
        raise RuntimeError(f"the {backend} spawn failed earlier") from _SPAWNED[(backend, "error")]
    if backend in _SPAWNED:
        return _SPAWNED[backend]
    try:
        ranks = spawn_world(_worker, WORLD, (backend,), SPAWN_DEADLINE_S,
                            f"lasp.distributed test ({backend}, {WORLD} processes)")
    except BaseException as e:
        _SPAWNED[(backend, "error")] = e
        raise
    _SPAWNED[backend] = ranks
    return ranks


# ----------------------------------------------------------------------------------------------
# Checks (parent)


def check_meshes(ranks, device_type):
    for r, res in enumerate(ranks):
        m = res["mesh"]["dp2xsp2"]
        assert m["names"] == ("dp", "sp") and m["shape"] == (2, 2), (r, m)
        assert m["device_type"] == device_type, (r, m)
        assert m["sp_ranks"] == [2 * (r // 2), 2 * (r // 2) + 1], f"rank {r}: sp group {m['sp_ranks']} (consecutive ranks)"
        assert m["dp_ranks"] == [r % 2, r % 2 + 2], f"rank {r}: dp group {m['dp_ranks']}"
        assert (m["dp_rank"], m["sp_rank"]) == divmod(r, 2), (r, m)
        m4 = res["mesh"]["sp4"]
        assert m4["shape"] == (1, 4) and m4["sp_ranks"] == [0, 1, 2, 3] and m4["dp_ranks"] == [r], (r, m4)
        m1 = res["mesh"]["dp4xsp1"]
        assert m1["shape"] == (4, 1) and m1["sp_ranks"] == [r] and m1["dp_ranks"] == [0, 1, 2, 3], (r, m1)


def check_round_trips(ranks):
    import lasp

    for key in ranks[0]["round_trip"]:
        gname, dim, n = key
        members = [list(range(WORLD))] if gname == "world" else [[0, 1], [2, 3]]
        x = round_trip_input(dim, n)
        d = dim % x.dim()
        for group in members:
            expect = torch.tensor_split(x, len(group), dim=d)
            for gr, r in enumerate(group):
                got = ranks[r]["round_trip"][key]
                where = f"{gname} dim {dim} N {n} rank {r}"
                a, b = lasp.distributed.shard_bounds(n, len(group), gr)
                assert torch.equal(got["piece"], x.narrow(d, a, b - a)), f"{where}: piece"
                assert torch.equal(got["piece"], expect[gr]), f"{where}: piece != tensor_split"
                assert got["contiguous"] and not got["shares_storage"], f"{where}: not a contiguous copy"
                assert torch.equal(got["back"], x), f"{where}: gather(split(x)) != x"
                assert torch.equal(got["back_sizes"], x), f"{where}: gather(split(x), sizes=...) != x"


def check_gather_grads(ranks):
    tol = TOL_SP[F64]
    for gname, n in ranks[0]["gather_grad"]:
        group_of = {r: ranks[r]["gather_grad"][(gname, n)]["group_ranks"] for r in range(WORLD)}
        for r in range(WORLD):
            group = group_of[r]
            x, _ = grad_problem(n, r)
            xs = x.clone().requires_grad_(True)
            loss = sum((torch.sin(xs) * grad_problem(n, j)[1]).sum() for j in group)
            (gx,) = torch.autograd.grad(loss, xs)
            a, b = __import__("lasp").distributed.shard_bounds(n, len(group), group.index(r))
            got = ranks[r]["gather_grad"][(gname, n)]
            where = f"{gname} N {n} rank {r} (group {group})"
            assert torch.equal(got["y"], x), f"{where}: gathered value"
            want = gx[:, a:b]
            assert got["grad"].shape == want.shape, f"{where}: grad shape {tuple(got['grad'].shape)} vs {tuple(want.shape)}"
            e = rel_err(got["grad"], want)
            assert e <= tol, f"{where}: gather gradient rel err {e:.3e} > {tol:.0e}"


_EXPECTED = {}


def attn_expected(lasp, ci, replica):
    """Single-process op (fp32) and fp64 reference on the whole sequence: o and grads of <o, do>."""
    key = (ci, replica)
    if key in _EXPECTED:
        return _EXPECTED[key]
    c, prob = ATTN_CASES[ci], attn_problem(ci, replica)
    out = {}
    for kind, dt in (("op", F32), ("ref", F64)):
        q, k, v = (prob[n].to(dt).requires_grad_(True) for n in ("q", "k", "v"))
        if kind == "op":
            o = lasp.lasp_attention(q, k, v, prob["decay"], layout=c["layout"])
        else:
            o, _ = ref.attention_ref(q, k, v, prob["decay"], None, None, c["layout"])
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), prob["do"].to(dt))
        out[kind] = dict(o=o.detach(), dq=dq, dk=dk, dv=dv)
    _EXPECTED[key] = out
    return out


def check_attention(lasp, ranks, which):
    """which: a strategy (each rank's piece vs the slice) or "gathered" (whole sequence, grads x SP)."""
    for ci, c in enumerate(ATTN_CASES):
        t = _tok_dim(c["layout"])
        for r, res in enumerate(ranks):
            dp_rank, sp_rank = res["dp_rank"], res["sp_rank"]
            assert (dp_rank, sp_rank) == divmod(r, SP)
            exp = attn_expected(lasp, ci, dp_rank)
            a, b = lasp.distributed.shard_bounds(c["N"], SP, sp_rank)
            got = res["attn"][(ci, which)]
            where = f"{which}: case {ci} rank {r} (dp {dp_rank}, sp {sp_rank}), tokens [{a}, {b})"
            for name in ("o", "dq", "dk", "dv"):
                want_op, want_ref = exp["op"][name], exp["ref"][name]
                if which == "gathered":
                    if name == "o":  # the whole sequence
                        pass
                    else:  # both sp ranks back-propagated the whole sequence's loss
                        want_op, want_ref = SP * want_op.narrow(t, a, b - a), SP * want_ref.narrow(t, a, b - a)
                else:
                    want_op, want_ref = want_op.narrow(t, a, b - a), want_ref.narrow(t, a, b - a)
                assert_close_to_ref(f"{where}: {name} vs fp64 reference", got[name], want_ref, F32)
                e = rel_err(got[name], want_op)
                assert e <= TOL_SP[F32], f"{where}: {name} vs single-process op: rel err {e:.3e} > {TOL_SP[F32]:.0e}"
            if b == a:
                assert got["o"].numel() == 0 or which == "gathered", where


# ----------------------------------------------------------------------------------------------
# Tests: gloo (CPU)

gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")


@gloo
def test_init_mesh_dp2_sp2_groups():
    check_meshes(_spawn("gloo"), "cpu")


@gloo
def test_split_gather_round_trip_uneven_and_empty():
    check_round_trips(_spawn("gloo"))


@gloo
def test_gather_gradient_matches_single_process():
    check_gather_grads(_spawn("gloo"))


@gloo
@pytest.mark.parametrize("which", STRATEGIES + ("gathered",))
def test_attention_on_dp2_sp2_mesh(lasp, which):
    check_attention(lasp, _spawn("gloo"), which)


@gloo
def test_errors_in_processes():
    ranks = _spawn("gloo")
    expect = {
        "sp_not_divisor": ("ValueError", "sp (3) must divide the world size (4)"),
        "dp_mismatch": ("ValueError", "dp * sp must equal the world size (4), got dp (3) * sp (2) = 6"),
        "sp_zero": ("ValueError", "sp must be >= 1, got 0"),
        "sp_str": ("TypeError", "sp must be an int, got str"),
        "sizes_len": ("ValueError", "sizes must have one entry per group rank (2), got 1"),
        "sizes_mine": ("ValueError", "is not this rank's piece length (x_local.shape[1] = 5)"),
        "dim_range": ("ValueError", "dim 3 is out of range for a tensor of shape (2, 5, 3)"),
        "group_type": ("TypeError", "group must be a torch.distributed.ProcessGroup or None, got str"),
        "sp_group_no_dim": ("ValueError", "mesh has no dimension named 'sp'"),
        "shape_mismatch": ("ValueError", "group rank 3: shape (2, 4, 4)"),
        "dtype_mismatch": ("ValueError", "group rank 1: shape (2, 1, 3) torch.float64"),
    }
    for r, res in enumerate(ranks):
        errs = res["errors"]
        for name, (etype, text) in expect.items():
            got = errs[name]
            assert got is not None, f"rank {r}: {name}: no error raised"
            assert got[0] == etype and text in got[1], f"rank {r}: {name}: got {got}, expected {etype} with {text!r}"
            assert got[1].startswith("lasp.distributed."), f"rank {r}: {name}: {got[1]!r} does not name the function"
        if r >= 2:
            assert errs["non_member"] is not None and errs["non_member"][0] == "ValueError"
            assert "not a member of group" in errs["non_member"][1], errs["non_member"]
        assert res["none_group_identity"]


# ----------------------------------------------------------------------------------------------
# Tests without processes


def test_errors_without_process_group(lasp):
    assert not dist.is_initialized()
    D = lasp.distributed
    with pytest.raises(RuntimeError, match=r"init_mesh: torch.distributed is not initialized"):
        D.init_mesh(sp=1)
    x = torch.randn(2, 3, 4)
    assert D.split_sequence(x, None) is x and D.gather_sequence(x, None) is x
    with pytest.raises(TypeError, match=r"sp_group: mesh must be a torch DeviceMesh .* got str"):
        D.sp_group("mesh")
    with pytest.raises(TypeError, match=r"dp_group: mesh must be a torch DeviceMesh"):
        D.dp_group(None)
    with pytest.raises(ValueError, match=r"shard_bounds: rank must be < world \(2\), got 2"):
        D.shard_bounds(5, 2, 2)
    with pytest.raises(ValueError, match=r"shard_bounds: n must be >= 0, got -1"):
        D.shard_bounds(-1, 2, 0)
    with pytest.raises(ValueError, match=r"shard_bounds: world must be >= 1, got 0"):
        D.shard_bounds(4, 0, 0)
    with pytest.raises(TypeError, match=r"shard_bounds: n must be an int, got float"):
        D.shard_bounds(4.0, 2, 0)


def test_shard_bounds_matches_tensor_split(lasp):
    for world in range(1, 6):
        for n in range(0, 12):
            bounds = [lasp.distributed.shard_bounds(n, world, r) for r in range(world)]
            sizes = [t.numel() for t in torch.tensor_split(torch.arange(n), world)]
            assert [b - a for a, b in bounds] == sizes, (n, world, bounds)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1)), bounds


# ----------------------------------------------------------------------------------------------
# NCCL (4 GPUs): the same worker, the attention, round-trip and gradient checks

_NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_dp2_sp2_nccl(lasp):
    if _NGPU < WORLD:
        pytest.skip(f"needs {WORLD} CUDA devices, found {_NGPU}")
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    ranks = _spawn("nccl")
    check_meshes(ranks, "cuda")
    check_round_trips(ranks)
    check_gather_grads(ranks)
    for which in STRATEGIES + ("gathered",):
        check_attention(lasp, ranks, which)
