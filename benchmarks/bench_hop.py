#!/usr/bin/env python3
"""Latency of one forward state chain of the LASP ring (rank r: receive, one update, send on) over W
GPUs, by three transports:
  pg    the process group's NCCL send/recv (what lasp uses)
  raw   a raw NCCL communicator driven on the current stream (ctypes, libnccl.so.2 as loaded by torch)
  symm  peer memory (torch symmetric memory): rank r waits for rank r-1's signal, reads its state over
        NVLink inside the update kernel, and signals rank r+1 (no copy kernel, no NCCL kernel)
Answers whether another transport would shorten the ring's hops. Default: the 1 MiB fp32 state of B=1,
H=16, D=E=128. Each transport's chain is first checked against the states of the previous ranks.

  NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 4 benchmarks/bench_hop.py
  NUMEL=65536 ...   # another state size (fp32 elements)

Prints the median over 50 chains (slowest rank, each chain started from ranks aligned by an all-reduce
behind a sleep kernel), twice per transport. Needs CUDA GPUs (one per rank).
"""
import ctypes
import os
import statistics

import torch
import torch.distributed as dist

rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
lib = ctypes.CDLL("libnccl.so.2")
class UID(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]
uid = UID()
if rank == 0:
    assert lib.ncclGetUniqueId(ctypes.byref(uid)) == 0
t = torch.tensor(list(ctypes.string_at(ctypes.addressof(uid), 128)), dtype=torch.uint8, device="cuda")
dist.broadcast(t, 0)
ctypes.memmove(ctypes.addressof(uid), bytes(t.cpu().tolist()), 128)
comm = ctypes.c_void_p()
r = lib.ncclCommInitRank(ctypes.byref(comm), W, uid, rank)
assert r == 0, r
n = int(os.environ.get("NUMEL", 16 * 128 * 128))
local = torch.randn(n, device="cuda"); g = torch.rand(n, device="cuda")
s_in = torch.empty(n, device="cuda"); s_out = torch.empty(n, device="cuda")
FLOAT = 7

def chain_raw():
    st = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    if rank > 0:
        assert lib.ncclRecv(ctypes.c_void_p(s_in.data_ptr()), ctypes.c_size_t(n), FLOAT, rank - 1, comm, st) == 0
        torch.addcmul(local, s_in, g, out=s_out)
    else:
        s_out.copy_(local)
    if rank < W - 1:
        assert lib.ncclSend(ctypes.c_void_p(s_out.data_ptr()), ctypes.c_size_t(n), FLOAT, rank + 1, comm, st) == 0

def chain_pg():
    if rank > 0:
        dist.irecv(s_in, rank - 1).wait()
        torch.addcmul(local, s_in, g, out=s_out)
    else:
        s_out.copy_(local)
    if rank < W - 1:
        dist.isend(s_out, rank + 1).wait()

flag = torch.zeros(1, device="cuda")
def timeit(fn, reps=50):
    ts = []
    for i in range(reps + 5):
        torch.cuda._sleep(1_000_000)
        dist.all_reduce(flag)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        x = torch.tensor([a.elapsed_time(b)], device="cuda")
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        if i >= 5:
            ts.append(x.item() * 1000)
    return statistics.median(ts)

# peer memory: each rank's outgoing state lives in a symmetric buffer the next rank reads directly
symm = None
try:
    import torch.distributed._symmetric_memory as symm_mem

    sbuf = symm_mem.empty(n, device="cuda")
    symm = symm_mem.rendezvous(sbuf, dist.group.WORLD.group_name)
    prev_view = symm.get_buffer(rank - 1, (n,), torch.float32) if rank > 0 else None
except Exception as e:  # noqa: BLE001 - report and measure the others
    if rank == 0:
        print(f"symm: not available here ({type(e).__name__}: {e})", flush=True)


def chain_symm():
    if rank > 0:
        symm.wait_signal(rank - 1)  # rank r-1's state is complete in its buffer
        torch.addcmul(local, prev_view, g, out=sbuf)  # read over NVLink inside the update
    else:
        sbuf.copy_(local)
    if rank < W - 1:
        symm.put_signal(rank + 1)


def check(name, fn, out):
    """out on every rank must be local + g * (out of the previous rank); rank 0's out is local."""
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    outs = [torch.empty_like(out) for _ in range(W)]
    dist.all_gather(outs, out)
    want = local if rank == 0 else torch.addcmul(local, outs[rank - 1], g)
    ok = torch.tensor([float(torch.equal(out, want))], device="cuda")
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() != 1.0:
        raise SystemExit(f"bench_hop: the {name} chain delivered wrong states")


transports = [("pg", chain_pg, s_out), ("raw", chain_raw, s_out)] + ([("symm", chain_symm, sbuf)] if symm else [])
for name, fn, out in transports:
    check(name, fn, out)
for name, fn, _ in transports + transports:
    us = timeit(fn)
    if rank == 0:
        print(f"W={W} numel={n} {name:4s} chain median {us:7.1f} us", flush=True)
lib.ncclCommDestroy(comm)
dist.destroy_process_group()
