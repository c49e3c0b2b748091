"""lasp.distributed's packed-document helpers: check_cu_seqlens, document_position_ids, split_packed, and
document_reset_gates (packed documents through lasp_attention's g, against each document alone).

One packed row (B = 1) of several documents with global offsets cu_seqlens; each rank takes its contiguous
piece (documents may span ranks, pieces may be empty) and the position of each token inside its document.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from conftest import import_lasp, spawn_world

SPAWN_DEADLINE_S = 120


def _d():
    return import_lasp().distributed


def _brute_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


@pytest.mark.parametrize("lengths", [[1], [5], [1, 1, 1], [3, 1, 7, 2], [16, 1, 1, 30]])
def test_document_position_ids(lengths):
    D = _d()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    want = _brute_positions(lengths)
    assert torch.equal(D.document_position_ids(cu), want)
    total = sum(lengths)
    for start in range(total + 1):
        for stop in range(start, total + 1):
            assert torch.equal(D.document_position_ids(cu, start, stop), want[start:stop])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_pieces_cover_the_row(world):
    """What split_packed gives rank r (its shard and positions) concatenates over the ranks to the whole row:
    documents cut at any rank boundary, one ending exactly on one, and empty pieces (world > tokens)."""
    D = _d()
    for lengths in ([4, 1, 6, 2], [2], [3, 3]):
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
        total = sum(lengths)
        pieces, pos = [], []
        for r in range(world):
            a, b = D.shard_bounds(total, world, r)
            pieces.append(torch.arange(total)[a:b])
            pos.append(D.document_position_ids(cu, a, b))
        assert torch.equal(torch.cat(pieces), torch.arange(total))
        assert torch.equal(torch.cat(pos), _brute_positions(lengths))


def test_split_packed_without_group():
    D = _d()
    x = torch.randn(1, 9, 4)
    cu = torch.tensor([0, 2, 9], dtype=torch.int64)
    piece, pos = D.split_packed(x, cu, None)
    assert torch.equal(piece, x) and piece.data_ptr() != x.data_ptr()
    assert pos.shape == (1, 9) and pos.dtype == torch.int64
    assert pos.tolist() == [[0, 1, 0, 1, 2, 3, 4, 5, 6]]


def test_errors_name_the_argument():
    D = _d()
    x = torch.zeros(1, 6, dtype=torch.long)
    good = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="batch size 1"):
        D.split_packed(torch.zeros(2, 6), good, None)
    with pytest.raises(ValueError, match="strictly increasing"):
        D.split_packed(x, torch.tensor([0, 4, 4, 6]), None)
    with pytest.raises(ValueError, match="strictly increasing"):
        D.split_packed(x, torch.tensor([0, 4, 2, 6]), None)
    with pytest.raises(ValueError, match=r"last offset of cu_seqlens \(5\) must equal the packed length \(6\)"):
        D.split_packed(x, torch.tensor([0, 2, 5]), None)
    with pytest.raises(ValueError, match="must start at 0"):
        D.split_packed(x, torch.tensor([1, 2, 6]), None)
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        D.split_packed(x, torch.tensor([0.0, 2.0, 6.0]), None)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        D.split_packed(x, [0, 2, 6], None)
    with pytest.raises(ValueError, match="at least 2 offsets"):
        D.split_packed(x, torch.tensor([6]), None)
    with pytest.raises(ValueError, match="stop"):
        D.document_position_ids(good, 0, 7)


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    D = _d()
    x = torch.arange(11).view(1, 11)
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    res = {"split": D.split_packed(x, cu, dist.group.WORLD)}
    # ranks disagree on the offsets: every rank raises the same error
    bad = cu.clone() if rank != 1 else torch.tensor([0, 5, 11], dtype=torch.int32)
    try:
        D.split_packed(x, bad, dist.group.WORLD)
        res["mismatch"] = None
    except ValueError as e:
        res["mismatch"] = str(e)
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_split_packed_on_a_group():
    ranks = spawn_world(_worker, 3, (), SPAWN_DEADLINE_S, "split_packed (gloo, 3 processes)")
    pieces = [r["split"][0] for r in ranks]
    pos = [r["split"][1] for r in ranks]
    assert torch.equal(torch.cat(pieces, 1), torch.arange(11).view(1, 11))
    assert torch.cat(pos, 1).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6]]
    for r, res in enumerate(ranks):
        assert res["mismatch"] is not None and "group ranks [1]" in res["mismatch"], f"rank {r}: {res['mismatch']}"


# ------------------------------------------------------------------ document_reset_gates
def _packed_problem(lengths, H=2, Hkv=1, D=5, E=4, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    q = torch.randn(1, H, N, D, generator=g_, dtype=torch.float64)
    k = torch.randn(1, Hkv, N, D, generator=g_, dtype=torch.float64)
    v = torch.randn(1, Hkv, N, E, generator=g_, dtype=torch.float64)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def _per_document(lasp, q, k, v, cu, decay):
    """Each document alone (the truth): outputs concatenated, and the last document's final state."""
    outs, f = [], None
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o, f = lasp.lasp_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], decay, output_final_state=True)
        outs.append(o)
    return torch.cat(outs, 2), f


@pytest.mark.parametrize("lengths", [[1], [7, 1, 70, 3], [64, 64, 1], [130]])
def test_document_reset_gates_equal_separate_documents(lengths):
    lasp = import_lasp()
    q, k, v, cu = _packed_problem(lengths)
    decay = torch.tensor([0.0, 0.3])
    g = _d().document_reset_gates(cu, 2).double()
    assert g.shape == (1, 2, sum(lengths)) and bool((g[:, :, 0] == 0).all())
    assert int(torch.isinf(g[0, 0]).sum()) == len(lengths) - 1
    o, f = lasp.lasp_attention(q, k, v, decay, g=g, output_final_state=True)
    want_o, want_f = _per_document(lasp, q, k, v, cu, decay)
    assert torch.allclose(o, want_o, rtol=1e-12, atol=1e-12)
    assert torch.allclose(f, want_f, rtol=1e-12, atol=1e-12)
    # the bnhd form is the transpose
    gb = _d().document_reset_gates(cu, 2, layout="bnhd")
    assert torch.equal(gb, g.float().transpose(1, 2))


def test_document_reset_gates_piece_and_errors():
    d = _d()
    cu = torch.tensor([0, 3, 5, 9])
    g = d.document_reset_gates(cu, 1, start=2, stop=6)  # tokens 2..5: starts at 3 and 5
    assert torch.equal(torch.isinf(g[0, 0]), torch.tensor([False, True, False, True]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        d.document_reset_gates(torch.tensor([0, 3, 3, 9]), 1)
    with pytest.raises(ValueError, match="stop"):
        d.document_reset_gates(cu, 1, start=0, stop=10)
    with pytest.raises(ValueError, match="num_heads"):
        d.document_reset_gates(cu, 0)
    with pytest.raises(ValueError, match="layout"):
        d.document_reset_gates(cu, 1, layout="nbhd")


def _reset_ring_worker(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        lasp = import_lasp()
        lengths, bounds = [5, 9, 2, 6], [0, 5, 6, 13, 22]  # a document boundary on a rank boundary (5)
        q, k, v, cu = _packed_problem(lengths, seed=3)
        a, b = bounds[rank], bounds[rank + 1]
        qs, ks, vs = (t[:, :, a:b].clone().requires_grad_() for t in (q, k, v))
        g = lasp.distributed.document_reset_gates(cu, 2, start=a, stop=b).double()
        o = lasp.lasp_attention(qs, ks, vs, torch.tensor([0.1, 0.0]), g=g, group=dist.group.WORLD)
        o.square().sum().backward()
        torch.save({"o": o.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_document_reset_gates_across_ranks():
    """Packed documents over 4 Gloo ranks (documents spanning ranks, one ending on a rank boundary): outputs and
    gradients equal each document computed alone."""
    lasp = import_lasp()
    res = spawn_world(_reset_ring_worker, 4, (), SPAWN_DEADLINE_S, "the packed reset-gate ring on 4 Gloo ranks")
    q, k, v, cu = _packed_problem([5, 9, 2, 6], seed=3)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    want_o, _ = _per_document(lasp, q, k, v, cu, torch.tensor([0.1, 0.0]))
    want_o.square().sum().backward()
    for name, got, want in (("o", "o", want_o.detach()), ("dq", "dq", q.grad), ("dk", "dk", k.grad),
                            ("dv", "dv", v.grad)):
        cat = torch.cat([r[got] for r in res], 2)
        assert torch.allclose(cat, want, rtol=1e-10, atol=1e-12), name
