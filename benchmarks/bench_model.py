"""Training throughput and peak memory of LaspForCausalLM under sequence-parallel methods.

    torchrun --standalone --nproc_per_node 8 benchmarks/bench_model.py --preset b1 --dtype bf16 \\
        --seq-lens 16384,32768,65536,131072 --find-max --json bench_model.json --plot bench_model.png
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_model.py --device cpu --preset tiny --seq-lens 64,128

All ranks form one sequence-parallel group (``lasp.distributed.init_mesh(sp=world)``); each holds
seq_len / sp tokens of every sequence (``lasp.distributed.split_sequence``). Methods, on the same
model (only the attention call differs):

  lasp            lasp.lasp_attention over the group: the LASP state ring.
  lasp-allgather  the same with strategy="allgather" (only if lasp_attention accepts `strategy`).
  ulysses         DeepSpeed-Ulysses: all-to-all from sequence-sharded to head-sharded, the op on the
                  full sequence for the local heads (group=None), all-to-all back.
  allgather-kv    all-gather k and v over the group (``lasp.distributed.gather_sequence``, backward a
                  reduce-scatter); each rank computes the op on the gathered prefix
                  (tokens 0..its end, its queries at their positions, zero queries before) and keeps its
                  slice: what gathering K/V costs in compute and memory.

A step is forward + backward of the chunked-loss model (no optimizer step), timed after warm-up
(median of --iters; CUDA synchronised). Reported per GPU: tokens/s (global tokens / step time / sp,
and the global rate), peak memory, and the loss (equal across methods: a built-in correctness check).
--find-max doubles the sequence length from the largest of --seq-lens until a method runs out of
memory (torch.cuda.OutOfMemoryError, agreed by all ranks) or reaches --max-seq-len. A method stops at
its first out-of-memory length; the JSON is rewritten after every measured row, so a run cut short
(--pg-timeout, an outer `timeout`) keeps what it measured.

Memory at long lengths: the loss is chunked (never (N, vocab) logits), --checkpoint keeps only each
layer's input, --param-dtype bf16 makes those inputs (the residual stream) bf16 instead of fp32, and
--lean additionally checkpoints the MLP (with its norm) and the attention output norm in token chunks
of --lean-chunk, so a layer's recomputation holds the attention projections but not the MLP's
(N x intermediate) activations or the norms' fp32 copies; --offload keeps the layer checkpoints in
pinned CPU memory instead of on the GPU (two host copies per layer and step). The 1B probe on 4 GPUs:

    torchrun --standalone --nproc_per_node 4 benchmarks/bench_model.py --preset b1 --checkpoint \\
        --param-dtype bf16 --lean --methods lasp --seq-lens 1048576,2097152 --warmup 1 --iters 1
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
        sizes = [n] * W  # equal pieces (the benchmark skips lengths not divisible by W): no length exchange
        kf = lasp.distributed.gather_sequence(k, group, dim=1, sizes=sizes)
        vf = lasp.distributed.gather_sequence(v, group, dim=1, sizes=sizes)
        end = (r + 1) * n  # tokens 0..end-1 are the causal context of this rank's queries
        qf = torch.cat([q.new_zeros((q.shape[0], r * n) + tuple(q.shape[2:])), q], 1) if r else q
        o = lasp.lasp_attention(qf, kf[:, :end], vf[:, :end], decay, scale=scale, group=None, layout="bnhd")
        return o[:, r * n:end]

    return attn


def make_lasp(lasp, group, **kw):
    def attn(q, k, v, decay, scale, grp):
        return lasp.lasp_attention(q, k, v, decay, scale=scale, group=group, layout="bnhd", **kw)

    return attn


def method_makers(lasp, group):
    """Method name -> a function making its attention (None: not in this build of lasp)."""
    has_strategy = "strategy" in inspect.signature(lasp.lasp_attention).parameters
    return {
        "lasp": lambda: make_lasp(lasp, group),
        "lasp-allgather": (lambda: make_lasp(lasp, group, strategy="allgather")) if has_strategy else None,
        "ulysses": lambda: make_ulysses(lasp, group),
        "allgather-kv": lambda: make_allgather_kv(lasp, group),
    }


def use_attn(lasp, model, attn):
    """Every LinearAttention of the model runs `attn` (see LinearAttention.attn_impl)."""
    for m in model.modules():
        if isinstance(m, lasp.nn.LinearAttention):
            m.attn_impl = attn


def build_model(lasp, cfg, device, param_dtype):
    torch.manual_seed(0)
    if device.type == "cuda":  # built on the GPU: a 1B model's init on one CPU thread per rank takes long
        with torch.device(device):
            model = lasp.models.LaspForCausalLM(cfg)
    else:
        model = lasp.models.LaspForCausalLM(cfg)
    if param_dtype == "bf16":
        model = model.to(torch.bfloat16)  # LinearAttention keeps its decay rates in fp32
    return model


class TokenChunkCheckpoint(torch.nn.Module):
    """Runs a per-token module on (B, N, C) inputs in chunks of `chunk` tokens, each chunk under
    activation checkpointing: backward keeps the input, not the module's activations (the MLP's
    N x intermediate tensors, the head norm's fp32 copies), and recomputes one chunk at a time."""

    def __init__(self, inner, chunk):
        super().__init__()
        self.inner, self.chunk = inner, chunk

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.inner(x)
        from torch.utils.checkpoint import checkpoint

        parts = [checkpoint(self.inner, x[:, s:s + self.chunk], use_reentrant=False)
                 for s in range(0, x.shape[1], self.chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def make_lean(model, chunk):
    """Token-chunked checkpointing of each block's MLP (with its norm), attention input norm and
    attention output norm (the norms' fp32 intermediates then live one chunk at a time)."""
    for blk in model.layers:
        blk.mlp = TokenChunkCheckpoint(torch.nn.Sequential(blk.mlp_norm, blk.mlp), chunk)
        blk.mlp_norm = torch.nn.Identity()
        blk.attn_norm = TokenChunkCheckpoint(blk.attn_norm, chunk)
        if blk.attn.o_norm is not None:
            blk.attn.o_norm = TokenChunkCheckpoint(blk.attn.o_norm, chunk)


class _OffloadedCheckpoint(torch.autograd.Function):
    """A layer checkpoint whose input waits in (pinned) CPU memory: forward runs the layer keeping
    nothing on the GPU; backward copies the input back, recomputes the layer with grad (same autocast
    state) and back-propagates through it; parameter gradients accumulate as in reentrant checkpointing."""

    @staticmethod
    def forward(ctx, x, layer, sp_group):
        ctx.layer, ctx.sp_group, ctx.device = layer, sp_group, x.device
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        if x.is_cuda:
            ctx.x_host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            ctx.x_host.copy_(x, non_blocking=True)  # stream-ordered: x's memory is reused only after the copy
        else:
            ctx.x_host = x.detach().clone()
        return layer(x, sp_group=sp_group)

    @staticmethod
    def backward(ctx, gy):
        x = ctx.x_host.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.x_host = None
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            y = ctx.layer(x, sp_group=ctx.sp_group)
        torch.autograd.backward(y, gy)
        return x.grad, None, None


class OffloadedLayer(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, sp_group=None):
        if torch.is_grad_enabled() and x.requires_grad:
            return _OffloadedCheckpoint.apply(x, self.layer, sp_group)
        return self.layer(x, sp_group=sp_group)


def make_offloaded(model):
    """Layer checkpointing with the checkpoints (each layer's input, the residual stream) in CPU memory."""
    model.gradient_checkpointing = False
    for i, layer in enumerate(model.layers):
        model.layers[i] = OffloadedLayer(layer)


# ----------------------------------------------------------------------------------------------


def _git_commit():
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def env_info(device):
    # LASP_COMMIT (set by gpu_suite.sh): a copy of the tree may carry a .git that is not current
    commit = os.environ.get("LASP_COMMIT") or _git_commit()
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit, "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world": dist.get_world_size()}
    return info


def run_one(model, cfg, attn, seq_len, args, device, group):
    """Median step time (s), peak memory (bytes or None), loss; raises torch.cuda.OutOfMemoryError."""
    lasp = _import_lasp()
    use_attn(lasp, model, attn)
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, seq_len + 1), generator=g)
    ids = lasp.distributed.split_sequence(tokens[:, :-1], group).to(device)
    labels = lasp.distributed.split_sequence(tokens[:, 1:], group).to(device)
    del tokens
    norm = float(args.batch_size * seq_len)
    if cfg.compile:  # each length compiled afresh for its own static shapes, as a run at that one length is
        torch._dynamo.reset()
    # bf16 weights: the model runs in bf16 without autocast (which would only add fp32 outputs of the ops it
    # keeps in fp32, and a bf16 copy of each per consumer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16" and args.param_dtype == "fp32")
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
    mem = reserved = None
    if device.type == "cuda":
        mt = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                          dtype=torch.float64, device=device)
        dist.all_reduce(mt, op=dist.ReduceOp.MAX, group=group)
        mem, reserved = int(mt[0].item()), int(mt[1].item())
    return tt.item(), mem, lt.item(), grad_norm, reserved


def _summed_grad_norm(model, group):
    """Norm of the gradient summed over the group (what training would apply): equal across methods."""
    flat = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
    dist.all_reduce(flat, group=group)
    return flat.norm().item()


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def try_one(model, cfg, attn, seq_len, args, device, group):
    """run_one, with an out-of-memory error on any rank turned into None on every rank (the ranks
    run the same shapes, so they run out at the same step; a rank stuck in a collective with one that
    ran out would end at the process group's timeout, --pg-timeout)."""
    res, oom = None, False
    try:
        res = run_one(model, cfg, attn, seq_len, args, device, group)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        oom = True  # the exception (and the activations its traceback holds) is dropped here
    if oom:
        model.zero_grad(set_to_none=True)
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flag = torch.tensor([1.0 if oom else 0.0], device=device)
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
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="autocast dtype (fp32 weights)")
    ap.add_argument("--param-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="weights (and so the residual stream and the checkpoints); bf16: the whole model in bf16 "
                         "(no autocast), half the activation memory")
    ap.add_argument("--lean", action="store_true",
                    help="also checkpoint the MLP and the attention output norm in token chunks (see the docstring)")
    ap.add_argument("--lean-chunk", type=int, default=65536, help="tokens per chunk for --lean")
    ap.add_argument("--offload", action="store_true",
                    help="layer checkpointing with the checkpoints in pinned CPU memory (replaces --checkpoint)")
    ap.add_argument("--pg-timeout", type=int, default=900, help="process-group timeout, seconds")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing of every layer")
    ap.add_argument("--chunked-loss", action="store_true",
                    help="the loss recomputed chunk by chunk in backward (LaspConfig.fused_loss=False) instead of "
                         "the fused loss, whose forward computes the gradients")
    ap.add_argument("--compile", action="store_true",
                    help="LaspConfig.compile: torch.compile each layer's per-token stages and the loss chunks "
                         "(every method runs the same compiled model; the attention calls stay outside)")
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

    if args.compile and (args.lean or args.offload):
        ap.error("--compile does not combine with --lean or --offload (they wrap the modules it compiles)")
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
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=args.pg_timeout))
    W, rank = dist.get_world_size(), dist.get_rank()
    group = lasp.distributed.sp_group(lasp.distributed.init_mesh(sp=W, device_type=device.type))

    cfg = getattr(lasp.models.LaspConfig, args.preset)()
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    cfg.checkpoint_layers = args.checkpoint
    cfg.compile = args.compile
    cfg.fused_loss = not args.chunked_loss
    model = build_model(lasp, cfg, device, args.param_dtype)
    if args.lean:
        make_lean(model, args.lean_chunk)
    if args.offload:
        make_offloaded(model)

    makers = method_makers(lasp, group)
    has_strategy = makers["lasp-allgather"] is not None
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
                batch_size=args.batch_size, checkpoint=args.checkpoint, has_strategy=has_strategy,
                param_dtype=args.param_dtype, compile=args.compile, lean=args.lean,
                lean_chunk=args.lean_chunk if args.lean else None,
                offload=args.offload,
                autocast=args.dtype if args.param_dtype == "fp32" and args.dtype != "fp32" else "off")
    if rank == 0:
        print(f"device {info['device']} x {W}, torch {info['torch']}, CUDA {info['cuda']}, commit {info['commit']}; "
              f"model {info['model_params'] / 1e6:.1f}M params, weights {args.param_dtype}, autocast {info['autocast']}, "
              f"batch {args.batch_size}, checkpoint {args.checkpoint}{', compiled' if args.compile else ''}, "
              f"loss {'chunked' if args.chunked_loss else 'fused'}"
              f"{', lean' if args.lean else ''}"
              f"{', offloaded checkpoints' if args.offload else ''}; "
              f"a step = forward + backward (no optimizer)", flush=True)

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
                if rank == 0:
                    print(f"{m:15s} seq {L:>9d}: skipped (not a multiple of the {W} ranks)", flush=True)
                continue
            res = try_one(model, cfg, attn, L, args, device, group)
            if res is None:
                rows.append(dict(method=m, seq_len=L, oom=True, lean=args.lean, offload=args.offload,
                                 param_dtype=args.param_dtype))
                if rank == 0:
                    print(f"{m:15s} seq {L:>9d}: out of memory", flush=True)
                    save_json(args.json, info, rows, max_len, args.find_max)
                break
            t, mem, loss, gnorm, reserved = res
            longest = L
            max_len[m] = longest
            row = dict(method=m, seq_len=L, oom=False, step_s=t, tokens_per_s=args.batch_size * L / t,
                       tokens_per_s_per_gpu=args.batch_size * L / t / W, peak_mem_bytes=mem,
                       peak_reserved_bytes=reserved, loss=loss, grad_norm=gnorm, lean=args.lean,
                       offload=args.offload, param_dtype=args.param_dtype)
            rows.append(row)
            if rank == 0:
                save_json(args.json, info, rows, max_len, args.find_max)
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
        print("\nlongest sequence run (forward + backward): " + ", ".join(f"{m} {v}" for m, v in max_len.items())
              + ("" if args.find_max else " (of the lengths tried; --find-max to search)"))
        save_json(args.json, info, rows, max_len, args.find_max)
        if args.plot:
            plot(args.plot, rows, info)
    dist.barrier()
    dist.destroy_process_group()


def save_json(path, info, rows, max_len, find_max):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"info": info, "rows": rows, "max_seq_len": max_len, "find_max": find_max}, f, indent=1)
    os.replace(tmp, path)


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
    _import_lasp().distributed._end_torchrun_process(0)
