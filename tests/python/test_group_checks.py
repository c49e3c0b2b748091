"""Distributed misuse: ranks that disagree on shapes, or a rank that never calls, end in a clear error
on every calling rank (real processes; gloo, and NCCL where 2 GPUs exist), never in a silent wrong answer
or an endless hang."""
import datetime
import faulthandler
import os
import queue
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port



def _worker(rank, world, port, case, backend, results):
    # a rank still running after 60 s prints every thread's stack (stderr), so a hang names its place
    faulthandler.dump_traceback_later(60, exit=False)
    try:
        import lasp

        # NCCL connects its channels at init instead of at their first use (where a launch blocks the host
        # until every peer joins, before lasp's timeout can apply): the state of a group a job has used
        os.environ["NCCL_RUNTIME_CONNECT"] = "0"
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        transport = "nccl"
        if backend == "peer":  # NCCL group, states over the peer-memory ring transport
            backend, transport = "nccl", "peer"
        lasp.set_ring_transport(transport)
        dev = torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(rank)
            dev = torch.device("cuda", rank)
        # NCCL: the communicator is made here (device_id), as in a training job whose group has been used,
        # so that the case tests lasp's waits rather than a communicator that is never completed
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60),
                                device_id=dev if backend == "nccl" else None)
        torch.manual_seed(rank)
        D = 4
        if case == "mismatch_d" and rank == 1:
            D = 5
        q, k, v = (torch.randn(1, 2, 6, d, device=dev, requires_grad=True) for d in (D, D, 3))
        if backend == "nccl":
            lasp.set_group_checks(True)  # opt-in for NCCL (auto: off)
        if case == "seg_states_group":
            # the ops' segment-state arguments are for one rank: with a group of several, each rank raises
            # before any communication (so none waits on another), and the group still works afterwards
            name, msgs = dist.group.WORLD.group_name, []
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            do, s_in = torch.ones(1, 2, 6, 3, device=dev), torch.empty(0, device=dev)
            calls = [
                lambda: torch.ops.lasp.lasp_attention_fwd(qd, kd, vd, None, 0.5, None, name, "ring", 2, 3),
                lambda: torch.ops.lasp.lasp_attention_bwd(qd, kd, vd, do, None, None, 0.5, s_in, name, "ring",
                                                          torch.zeros(1, 2, 2, D, 3, device=dev), 3),
            ]
            for call in calls:
                try:
                    call()
                    msgs.append("no error")
                except ValueError as e:
                    msgs.append(str(e))
            lasp.lasp_attention(q, k, v, group=dist.group.WORLD).sum().backward()
            results.put((rank, "ok", "\n".join(msgs)))
            return
        if case in ("bad_g_one", "bad_g_all", "bad_decay_one"):
            # a positive log gate or a negative decay rate on one rank (or bad gates on all): with group checks
            # on, the outcome of each rank's own checks travels with the call's description, so no rank is left
            # waiting at a collective for one that raised
            g = -torch.rand(1, 2, 6, device=dev)
            decay = torch.tensor([0.1, 0.2], device=dev)
            if case == "bad_g_all" or (case == "bad_g_one" and rank == 1):
                g[0, 1, 3] = 0.5 if rank % 2 else float("nan")
            if case == "bad_decay_one" and rank == 1:
                decay[1] = -0.2
            try:
                lasp.lasp_attention(q, k, v, decay=decay, g=g, group=dist.group.WORLD)
                results.put((rank, "ok", ""))
            except (ValueError, RuntimeError) as e:
                results.put((rank, type(e).__name__, str(e)))
            if backend == "nccl":
                torch.cuda.synchronize()
            return
        if case == "missing_rank":
            lasp.set_group_checks(True, timeout_s=3.0)
            if rank == world - 1:
                results.put((rank, "skipped", ""))
                time.sleep(12)  # stays alive (its connections open) but never calls lasp_attention
                return
        try:
            # forward and backward: with the peer transport the first rank's forward only sends, so it
            # can finish; its backward must receive
            lasp.lasp_attention(q, k, v, group=dist.group.WORLD).sum().backward()
            if backend == "nccl":
                torch.cuda.synchronize()
            results.put((rank, "ok", ""))
        except RuntimeError as e:
            results.put((rank, "error", str(e)))
        if backend == "nccl":
            # a rank whose NCCL work can never finish would hang in teardown: deliver the verdict, then leave
            results.close()
            results.join_thread()
            os._exit(0)
    except Exception:
        results.put((rank, "crash", traceback.format_exc()))


BACKENDS = [
    pytest.param("gloo", 3, id="gloo"),
    pytest.param("nccl", 2, id="nccl", marks=pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason=f"needs 2 CUDA devices for nccl, found {torch.cuda.device_count()}")),
    pytest.param("peer", 2, id="peer", marks=pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason=f"needs 2 CUDA devices for the peer transport, found {torch.cuda.device_count()}")),
]


def _run(case, backend="gloo", world=3, deadline=90):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, backend, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world):
            rank, status, msg = results.get(timeout=deadline)
            out[rank] = (status, msg)
    except queue.Empty:
        pytest.fail(f"{case}: ranks {sorted(set(range(world)) - set(out))} did not finish in {deadline} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


@pytest.mark.parametrize("backend,world", BACKENDS)
def test_mismatched_head_dim_raises_on_every_rank(backend, world):
    out = _run("mismatch_d", backend, world)
    for rank, (status, msg) in out.items():
        assert status == "error", (rank, status, msg)
        assert "lasp_attention: the ranks of the group disagree" in msg, msg
        assert "head dim D (rank 0: 4, rank 1: 5)" in msg, msg


@pytest.mark.parametrize("backend,world", BACKENDS)
def test_rank_that_never_calls_times_out_on_the_others(backend, world):
    out = _run("missing_rank", backend, world)
    assert out[world - 1][0] == "skipped"
    for rank in range(world - 1):
        status, msg = out[rank]
        assert status == "error", (rank, status, msg)
        assert "timed out" in msg and "lasp_attention" in msg, msg


@pytest.mark.parametrize("backend,world", BACKENDS)
def test_segment_states_with_a_group_raise_on_every_rank(backend, world):
    """seg_nseg > 1 on the forward op and seg_states on the backward op are for calls on one rank; with a group
    of several ranks both raise a ValueError on every rank, before any communication (the group then runs
    lasp_attention forward and backward as usual)."""
    out = _run("seg_states_group", backend, world)
    for rank, (status, msg) in out.items():
        assert status == "ok", (rank, status, msg)
        fwd, bwd = msg.split("\n")
        assert fwd.startswith("lasp_attention_fwd: seg_nseg > 1 keeps the segment states of a call on one rank; "
                              f"across the {world} ranks of group "), fwd
        assert fwd.endswith("pass seg_nseg = 0, got seg_nseg = 2"), fwd
        assert bwd.startswith("lasp_attention_bwd: seg_states are the segment states a forward on one rank kept; "
                              f"across the {world} ranks of group "), bwd
        assert bwd.endswith("pass seg_states = None, got a tensor of shape [1, 2, 2, 4, 3]"), bwd


def test_ring_transport_setting_round_trips_and_rejects_unknown_values(lasp):
    before = lasp.get_ring_transport()
    try:
        for t in ("nccl", "peer", "auto"):
            lasp.set_ring_transport(t)
            assert lasp.get_ring_transport() == t
        with pytest.raises(ValueError, match="transport must be 'auto', 'nccl' or 'peer', got 'fast'"):
            lasp.set_ring_transport("fast")
        assert lasp.get_ring_transport() == "auto"  # unchanged by the refused call
    finally:
        lasp.set_ring_transport(before)


@pytest.mark.parametrize("backend,world", BACKENDS)
@pytest.mark.parametrize("case,why", [("bad_g_one", "g must hold log gates <= 0 (-inf: a reset), got a value > 0"),
                                      ("bad_decay_one", "decay")])
def test_bad_values_on_one_rank_raise_on_every_rank(backend, world, case, why):
    """A positive log gate or a negative decay rate on rank 1 only: rank 1 raises why, every other rank that the
    call is not valid on rank 1 (with group checks on: Gloo's default, opted in for NCCL here); none waits at a
    collective for the rank that raised."""
    out = _run(case, backend, world)
    for rank, (status, msg) in out.items():
        assert status == "ValueError", (rank, status, msg)
        if rank == 1:
            assert msg.startswith("lasp_attention") and why in msg and "not valid on group ranks" not in msg, msg
        else:
            assert "lasp_attention: the forward call is not valid on group ranks [1] (see their errors)" in msg, msg


@pytest.mark.parametrize("backend,world", BACKENDS)
def test_bad_gate_values_on_every_rank_raise_why(backend, world):
    """Bad log gates on every rank (positive on odd ranks, NaN on even ones): each rank raises the ValueError that
    says what its g holds."""
    out = _run("bad_g_all", backend, world)
    for rank, (status, msg) in out.items():
        assert status == "ValueError", (rank, status, msg)
        want = "got a value > 0" if rank % 2 else "got NaN"
        assert f"lasp_attention: g must hold log gates <= 0 (-inf: a reset), {want}" in msg, msg
