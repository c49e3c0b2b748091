"""Distributed misuse: ranks that disagree on shapes, or a rank that never calls, end in a clear error
on every calling rank (gloo, real processes), never in a silent wrong answer or an endless hang."""
import datetime
import os
import queue
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port



def _worker(rank, world, port, case, results):
    try:
        import lasp

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        torch.manual_seed(rank)
        D = 4
        if case == "mismatch_d" and rank == 1:
            D = 5
        q, k, v = torch.randn(1, 2, 6, D), torch.randn(1, 2, 6, D), torch.randn(1, 2, 6, 3)
        if case == "missing_rank":
            lasp.set_group_checks(True, timeout_s=3.0)
            if rank == world - 1:
                results.put((rank, "skipped", ""))
                time.sleep(12)  # stays alive (its connections open) but never calls lasp_attention
                return
        try:
            lasp.lasp_attention(q, k, v, group=dist.group.WORLD)
            results.put((rank, "ok", ""))
        except RuntimeError as e:
            results.put((rank, "error", str(e)))
    except Exception:
        results.put((rank, "crash", traceback.format_exc()))


def _run(case, world=3, deadline=90):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, results)) for r in range(world)]
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


def test_mismatched_head_dim_raises_on_every_rank():
    out = _run("mismatch_d")
    for rank, (status, msg) in out.items():
        assert status == "error", (rank, status, msg)
        assert "lasp_attention: the ranks of the group disagree" in msg, msg
        assert "head dim D (rank 0: 4, rank 1: 5)" in msg, msg


def test_rank_that_never_calls_times_out_on_the_others():
    out = _run("missing_rank")
    assert out[2][0] == "skipped"
    for rank in (0, 1):
        status, msg = out[rank]
        assert status == "error", (rank, status, msg)
        assert "timed out" in msg and "lasp_attention" in msg, msg
