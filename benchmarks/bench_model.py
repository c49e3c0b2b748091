"""Training throughput and peak memory of LaspForCausalLM under sequence-parallel methods.

    torchrun --standalone --nproc_per_node 8 benchmarks/bench_model.py --preset b1 --dtype bf16 \\
        --seq-lens 16384,32768,65536,131072 --find-max --json bench_model.json --plot bench_model.png
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_model.py --device cpu --preset tiny --seq-lens 64,128

All ranks form one sequence-parallel group (world = sp); each holds seq_len / sp tokens of every
sequence. Methods, on the same model (only the attention call differs):

  lasp            lasp.lasp_attention over the group: the LASP state ring.
  lasp-allgather  the same with strategy="allgather" (only if lasp_attention accepts `strategy`).
  ulysses         DeepSpeed-Ulysses: all-to-all from sequence-sharded to head-sharded, the op on the
                  full sequence for the local heads (group=None), all-to-all back.
  allgather-kv    all-gather k and v over the group; each rank computes the op on the gathered prefix
                  (tokens 0..its end, its queries at their positions, zero queries before) and keeps its
                  slice: what gathering K/V costs in compute and memory.

A step is forward + backward of the chunked-loss model (no optimizer step), timed after warm-up
(median of --iters; CUDA synchronised). Reported per GPU: tokens/s (global tokens / step time / sp,
and the global rate), peak memory, and the loss (equal across methods: a built-in correctness check).
--find-max doubles the sequence length from the largest of --seq-lens until a method runs out of
memory (torch.cuda.OutOfMemoryError, agreed by all ranks) or reaches --max-seq-len.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _import_lasp():
    import lasp

    try:
        import lasp.models  # noqa: F401
    except ModuleNotFoundError:  # the installed lasp is another checkout: use this repository's modules
        lasp.__path__.append(os.path.join(REPO, "python", "lasp"))
        import lasp.models  # noqa: F401
    return lasp


# ----------------------------------------------------------------------------------------------
# Differentiable collectives for the baselines


class _AllToAll(torch.autograd.Function):
    """x (W, ...) contiguous: chunk j goes to rank j; the result's chunk i came from rank i."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        out = torch.empty_like(g)
        dist.all_to_all_single(out, g, group=ctx.group)
        return out, None


class _AllGather(torch.autograd.Function):
    """x (B, n, ...) -> (B, W*n, ...) gathered along dim 1; backward: sum over ranks, keep own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        W = dist.get_world_size(group)
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[1]
        buf = torch.empty((W * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(buf, x.contiguous(), group=group)  # rank-major along dim 0
        return buf.unflatten(0, (W, x.shape[0])).transpose(0, 1).flatten(1, 2)

    @staticmethod
    def backward(ctx, g):
        W = dist.get_world_size(ctx.group)
        g = g.unflatten(1, (W, ctx.n)).transpose(0, 1).contiguous()  # (W, B, n, ...)
        if g.is_cuda:
            out = torch.empty_like(g[0])
            dist.reduce_scatter_tensor(out, g.flatten(0, 1), group=ctx.group)
        else:  # gloo has no reduce_scatter: all-reduce and keep this rank's slice
            dist.all_reduce(g, group=ctx.group)
            out = g[ctx.rank]
        return out, None


def make_ulysses(lasp, group):
    W = dist.get_world_size(group)
    r = dist.get_rank(group)

    def seq_to_heads(x):  # (B, n, H, X) -> (B, W*n, H/W, X)
        B, n, H, X = x.shape
        x = x.reshape(B, n, W, H // W, X).permute(2, 0, 1, 3, 4)  # (W, B, n, H/W, X)
        y = _AllToAll.apply(x, group)  # chunk i: rank i's tokens, my heads
        return y.permute(1, 0, 2, 3, 4).reshape(B, W * n, H // W, X)

    def heads_to_seq(x):  # (B, W*n, H/W, X) -> (B, n, H, X)
        B, N, h, X = x.shape
        n = N // W
        x = x.reshape(B, W, n, h, X).permute(1, 0, 2, 3, 4)  # chunk j: rank j's tokens
        y = _AllToAll.apply(x, group)  # chunk i: my tokens, rank i's heads
        return y.permute(1, 2, 0, 3, 4).reshape(B, n, W * h, X)

    def attn(q, k, v, decay, scale, _group):
        H, Hkv = q.shape[2], k.shape[2]
        if H % W:
            raise ValueError(f"ulysses: num_heads {H} is not divisible by the group size {W}")
        if Hkv % W:  # replicate kv heads so that each rank's query heads find theirs
            k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        qh, kh, vh = seq_to_heads(q), seq_to_heads(k), seq_to_heads(v)
        h = H // W
        d = None if decay is None else decay[r * h:(r + 1) * h]
        o = lasp.lasp_attention(qh, kh, vh, d, scale=scale, group=None, layout="bnhd")
        return heads_to_seq(o)

    return attn


def make_allgather_kv(lasp, group):
    W = dist.get_world_size(group)
    r = dist.get_rank(group)

    def attn(q, k, v, decay, scale, _group):
        n = q.shape[1]
        kf, vf = _AllGather.apply(k, group), _AllGather.apply(v, group)
        end = (r + 1) * n  # tokens 0..end-1 are the causal context of this rank's queries
        qf = torch.cat([q.new_zeros((q.shape[0], r * n) + tuple(q.shape[2:])), q], 1) if r else q
        o = lasp.lasp_attention(qf, kf[:, :end], vf[:, :end], decay, scale=scale, group=None, layout="bnhd")
        return o[:, r * n:end]

    return attn


def make_lasp(lasp, group, **kw):
    def attn(q, k, v, decay, scale, grp):
        return lasp.lasp_attention(q, k, v, decay, scale=scale, group=group, layout="bnhd", **kw)

    return attn


# ----------------------------------------------------------------------------------------------


def env_info(device):
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "-dirty" if dirty else ""
    except Exception:  # noqa: BLE001
        commit = "unknown"
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit, "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world": dist.get_world_size()}
    return info


def run_one(model, cfg, attn, seq_len, args, device, group):
    """Median step time (s), peak memory (bytes or None), loss; raises torch.cuda.OutOfMemoryError."""
    lasp = _import_lasp()
    W, r = dist.get_world_size(group), dist.get_rank(group)
    n = seq_len // W
    for m in model.modules():
        if isinstance(m, lasp.nn.LinearAttention):
            m.attn_impl = attn
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, seq_len + 1), generator=g)
    ids = tokens[:, :-1][:, r * n:(r + 1) * n].to(device)
    labels = tokens[:, 1:][:, r * n:(r + 1) * n].to(device)
    norm = float(args.batch_size * seq_len)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, loss, grad_norm = [], None, None
    for it in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group)
        t0 = time.perf_counter()
        with autocast:
            out = model(ids, labels, sp_group=group, loss_normalizer=norm)
        out.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter() - t0
        if args.check_grads and it == args.warmup + args.iters - 1:
            grad_norm = _summed_grad_norm(model, group)
        model.zero_grad(set_to_none=True)
        if it >= args.warmup:
            times.append(t)
        loss = out.loss.detach().float()
        del out
    tt = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX, group=group)  # the step takes as long as the slowest rank
    lt = loss.clone()
    dist.all_reduce(lt, group=group)
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if mem is not None:
        mt = torch.tensor([mem], dtype=torch.float64, device=device)
        dist.all_reduce(mt, op=dist.ReduceOp.MAX, group=group)
        mem = int(mt.item())
    return tt.item(), mem, lt.item(), grad_norm


def _summed_grad_norm(model, group):
    """Norm of the gradient summed over the group (what training would apply): equal across methods."""
    flat = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
    dist.all_reduce(flat, group=group)
    return flat.norm().item()


def try_one(model, cfg, attn, seq_len, args, device, group):
    """run_one, with an OOM on any rank turned into None on every rank."""
    err = None
    res = None
    try:
        res = run_one(model, cfg, attn, seq_len, args, device, group)
    except torch.cuda.OutOfMemoryError as e:  # the other ranks are expected to fail the same way (same shapes)
        err = e
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    flag = torch.tensor([1.0 if err is not None else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return None if flag.item() > 0 else res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["tiny", "small", "b1"], default="b1")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--num-kv-heads", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--seq-lens", default="8192,16384,32768,65536", help="global sequence lengths, comma-separated")
    ap.add_argument("--methods", default="lasp,lasp-allgather,ulysses,allgather-kv")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing of every layer")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--find-max", action="store_true", help="double the length until OOM for each method")
    ap.add_argument("--max-seq-len", type=int, default=1 << 22)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check-grads", action="store_true",
                    help="also record the norm of the group-summed gradient (one extra all-reduce; equal across methods)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG (tokens/s and memory vs length) here")
    args = ap.parse_args(argv)

    lasp = _import_lasp()
    if "RANK" not in os.environ:  # plain `python bench_model.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=900))
    group = dist.group.WORLD
    W, rank = dist.get_world_size(), dist.get_rank()

    cfg = getattr(lasp.models.LaspConfig, args.preset)()
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    cfg.checkpoint_layers = args.checkpoint
    torch.manual_seed(0)
    model = lasp.models.LaspForCausalLM(cfg).to(device)

    has_strategy = "strategy" in inspect.signature(lasp.lasp_attention).parameters
    makers = {
        "lasp": lambda: make_lasp(lasp, group),
        "lasp-allgather": (lambda: make_lasp(lasp, group, strategy="allgather")) if has_strategy else None,
        "ulysses": lambda: make_ulysses(lasp, group),
        "allgather-kv": lambda: make_allgather_kv(lasp, group),
    }
    methods = []
    for m in args.methods.split(","):
        if m not in makers:
            raise SystemExit(f"bench_model.py: unknown method {m!r} (choose from {list(makers)})")
        if makers[m] is None:
            if rank == 0:
                print(f"skip {m}: lasp.lasp_attention has no `strategy` keyword in this build")
            continue
        if m == "ulysses" and cfg.num_heads % W:
            if rank == 0:
                print(f"skip ulysses: {cfg.num_heads} heads not divisible by {W} ranks")
            continue
        methods.append(m)

    info = env_info(device)
    info.update(model_params=model.num_parameters(), config=cfg.to_dict(), dtype=args.dtype,
                batch_size=args.batch_size, checkpoint=args.checkpoint, has_strategy=has_strategy)
    if rank == 0:
        print(f"device {info['device']} x {W}, torch {info['torch']}, CUDA {info['cuda']}, commit {info['commit']}; "
              f"model {info['model_params'] / 1e6:.1f}M params, {args.dtype}, batch {args.batch_size}, "
              f"checkpoint {args.checkpoint}", flush=True)

    lens = [int(s) for s in args.seq_lens.split(",") if s]
    rows, max_len = [], {}
    for m in methods:
        attn = makers[m]()
        todo = list(lens)
        longest = None
        i = 0
        while i < len(todo):
            L = todo[i]
            i += 1
            if L % W:
                continue
            res = try_one(model, cfg, attn, L, args, device, group)
            if res is None:
                rows.append(dict(method=m, seq_len=L, oom=True))
                if rank == 0:
                    print(f"{m:15s} seq {L:>9d}: out of memory", flush=True)
                break
            t, mem, loss, gnorm = res
            longest = L
            row = dict(method=m, seq_len=L, oom=False, step_s=t, tokens_per_s=args.batch_size * L / t,
                       tokens_per_s_per_gpu=args.batch_size * L / t / W, peak_mem_bytes=mem, loss=loss,
                       grad_norm=gnorm)
            rows.append(row)
            if rank == 0:
                memstr = f"{mem / 2**30:8.2f} GiB" if mem is not None else "       n/a"
                print(f"{m:15s} seq {L:>9d}: {t * 1e3:10.2f} ms  {row['tokens_per_s_per_gpu']:12,.0f} tok/s/gpu  "
                      f"{memstr}  loss {loss:.6f}", flush=True)
            if args.find_max and i == len(todo) and 2 * L <= args.max_seq_len:
                todo.append(2 * L)
        max_len[m] = longest

    if rank == 0:
        print("\n| method | seq len | ms/step | tokens/s/GPU | peak GiB/GPU | loss |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            if r["oom"]:
                print(f"| {r['method']} | {r['seq_len']} | OOM | | | |")
            else:
                mem = f"{r['peak_mem_bytes'] / 2**30:.2f}" if r["peak_mem_bytes"] is not None else "n/a"
                print(f"| {r['method']} | {r['seq_len']} | {r['step_s'] * 1e3:.2f} | {r['tokens_per_s_per_gpu']:,.0f} "
                      f"| {mem} | {r['loss']:.6f} |")
        print("\nlongest sequence trained: " + ", ".join(f"{m} {v}" for m, v in max_len.items())
              + ("" if args.find_max else " (of the lengths tried; --find-max to search)"))
        result = {"info": info, "rows": rows, "max_seq_len": max_len, "find_max": args.find_max}
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.plot:
            plot(args.plot, rows, info)
    dist.barrier()
    dist.destroy_process_group()


def plot(path, rows, info):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot written to {path}", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in sorted({r["method"] for r in rows}):
        ok = [r for r in rows if r["method"] == m and not r["oom"]]
        xs = [r["seq_len"] for r in ok]
        axes[0].plot(xs, [r["tokens_per_s_per_gpu"] for r in ok], marker="o", label=m)
        if ok and ok[0]["peak_mem_bytes"] is not None:
            axes[1].plot(xs, [r["peak_mem_bytes"] / 2**30 for r in ok], marker="o", label=m)
    for ax, yl in zip(axes, ["tokens/s per GPU", "peak memory per GPU (GiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (global)")
        ax.set_ylabel(yl)
        if ax.get_lines():
            ax.legend()
    fig.suptitle(f"{info['device']} x {info['world']}, {info['model_params'] / 1e6:.0f}M params, commit {info['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
