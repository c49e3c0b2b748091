#!/usr/bin/env python3
"""Latency of one forward state chain of the LASP ring (rank r: receive, one update, send on) over W
GPUs: through the process group's NCCL send/recv (what lasp uses) and through a raw NCCL communicator
driven on the current stream (ctypes, libnccl.so.2 as loaded by torch). Answers whether a raw
communicator would shorten the ring's hops. Default: the 1 MiB fp32 state of B=1, H=16, D=E=128.

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

# correctness of the raw chain: rank r received rank r-1's s_out
chain_raw(); torch.cuda.synchronize()
outs = [torch.empty_like(s_out) for _ in range(W)]
dist.all_gather(outs, s_out)
if rank > 0:
    assert torch.equal(s_in, outs[rank - 1]), "raw chain delivered the wrong state"
for name, fn in (("pg", chain_pg), ("raw", chain_raw), ("pg", chain_pg), ("raw", chain_raw)):
    us = timeit(fn)
    if rank == 0:
        print(f"W={W} numel={n} {name:4s} chain median {us:7.1f} us", flush=True)
lib.ncclCommDestroy(comm)
dist.destroy_process_group()
