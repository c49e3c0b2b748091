"""Train a lasp.models.LaspForCausalLM with data parallelism x LASP sequence parallelism.

    torchrun --standalone --nproc_per_node 8 examples/train.py --preset b1 --sp 4 --dp-mode fsdp \\
        --seq-len 65536 --batch-size 1 --steps 200 --device cuda --dtype bf16 --checkpoint
    torchrun --standalone --nproc_per_node 2 examples/train.py --preset tiny --sp 2 --device cpu

Ranks form a 2-D DeviceMesh (dp, sp) (``lasp.distributed.init_mesh``, dp = world / sp; consecutive
ranks share a sequence). Every sequence of the global batch is cut into sp contiguous pieces
(``lasp.distributed.split_sequence``); sp rank r holds piece r, and the LASP ring inside every
attention layer passes the d x e state between pieces. Gradients of the (sp-replicated) parameters are:

  * summed over sp after backward (``lasp.distributed.allreduce_grads``: one flattened all-reduce), then
  * averaged over dp by DDP (``--dp-mode ddp``, process_group = the dp group) or by FSDP2
    (``--dp-mode fsdp``: ``fully_shard`` over the dp mesh dimension, parameters sharded over dp).

Each rank's loss is its tokens' summed cross-entropy divided by the tokens of one dp replica's
batch (batch x seq_len), so the sum over sp is that replica's mean and the dp average is the global
mean: the steps are exactly those of the same model trained on one process (up to float rounding).
The loss never materialises full-vocabulary logits for the whole sequence (chunked cross-entropy whose
forward also computes its gradients: see ``lasp.models.fused_linear_cross_entropy``); ``--checkpoint``
keeps only each layer's input.

Convergence check (runs torchrun twice, same seed: sp=1 and sp=--sp; writes both loss curves to
JSON and a PNG, fails if they differ by more than the tolerance):

    python examples/train.py --convergence-check --sp 4 --preset tiny --device cpu --steps 20 --out-dir runs/cc

With ``--noise-ref`` (for ``--dtype bf16``) it also trains sp=1 in float32 and accepts the sp=--sp
curve when it stays as close to the sp=1 bf16 curve as twice the largest bf16-vs-fp32 difference
(flash-attention's "at most 2x the error of the reference in low precision" rule, applied to the loss
curve; ``--tolerance`` is the floor).

Data: a deterministic synthetic stream (from --seed and the step), a mixture of repeated random
motifs and a noisy drift chain, so the loss falls; nothing is downloaded.

Packed documents (``--pack``): every row is filled with whole documents (the last one cut at the row's
end), each document's state is reset at its start in every layer (``LaspForCausalLM(doc_starts=...)``, also
across the sp pieces), and the label that would predict a document's first token from the previous one is
ignored. Documents come from ``--data FILE`` (a tokenized text file: one document per line, token ids
separated by spaces, read once with a progress bar, taken in order and cycled) or, without it, from the
synthetic stream cut into documents of 8 to --max-doc-len tokens. The loss divides by the valid labels of
each dp replica's batch, so with dp > 1 the step averages the replicas' means.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
# Data


def synthetic_batch(seed: int, step: int, batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """(batch, seq_len + 1) int64 tokens, a deterministic function of (seed, step).

    Even rows: a random motif (length 8..64) repeated (learnable by attention: copy from one period back).
    Odd rows: x[t] = x[t-1] + delta[t] mod V with delta in {1, 2, 3, 7} at probabilities (.7, .1, .1, .1)
    (learnable per token: entropy ~0.94 nats). Vectorised (cumsum), so long sequences are cheap.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    T = seq_len + 1
    out = torch.empty(batch, T, dtype=torch.int64)
    for b in range(batch):
        if b % 2 == 0:
            m = int(torch.randint(8, 65, (1,), generator=g))
            motif = torch.randint(0, vocab, (m,), generator=g)
            out[b] = motif.repeat(T // m + 1)[:T]
        else:
            choice = torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), T, replacement=True, generator=g)
            delta = torch.tensor([1, 2, 3, 7])[choice]
            x0 = torch.randint(0, vocab, (1,), generator=g)
            out[b] = (x0 + torch.cumsum(delta, 0)) % vocab
    return out


class DocumentSource:
    """Documents (1-D int64 tensors) for --pack: the lines of a tokenized text file in order (cycled), or
    synthetic ones (deterministic in --seed: the rows of synthetic_batch cut to random lengths)."""

    def __init__(self, path, seed: int, vocab: int, max_len: int, progress: bool):
        self.docs, self.i, self.seed, self.vocab, self.max_len, self.n_made = None, 0, seed, vocab, max_len, 0
        self.gen = torch.Generator().manual_seed(seed * 7919 + 1)
        if path:
            lines = open(path).read().splitlines()
            it = lines
            if progress:
                try:
                    from tqdm import tqdm

                    it = tqdm(lines, desc=f"reading {os.path.basename(path)}", unit="doc")
                except ImportError:
                    pass
            docs = []
            for ln, line in enumerate(it, 1):
                if not line.strip():
                    continue
                try:
                    doc = torch.tensor([int(t) for t in line.split()], dtype=torch.int64)
                except ValueError:
                    raise SystemExit(f"train.py: --data {path}, line {ln}: expected token ids separated by spaces")
                if (doc < 0).any() or (doc >= vocab).any():
                    raise SystemExit(f"train.py: --data {path}, line {ln}: token ids must be in [0, {vocab})")
                docs.append(doc)
            if not docs:
                raise SystemExit(f"train.py: --data {path} holds no documents")
            self.docs = docs

    def next(self) -> torch.Tensor:
        if self.docs is not None:
            doc = self.docs[self.i % len(self.docs)]
            self.i += 1
            return doc
        n = int(torch.randint(8, self.max_len + 1, (1,), generator=self.gen))
        row = synthetic_batch(self.seed, 10_000_000 + self.n_made, 2, n - 1, self.vocab)[self.n_made % 2]
        self.n_made += 1
        return row


def packed_batch(source: DocumentSource, batch: int, seq_len: int):
    """(batch, seq_len + 1) tokens filled with whole documents (the last cut at the row's end) and the bool
    (batch, seq_len + 1) document starts (position 0 not marked: nothing comes before it)."""
    T = seq_len + 1
    tokens = torch.empty(batch, T, dtype=torch.int64)
    starts = torch.zeros(batch, T, dtype=torch.bool)
    for b in range(batch):
        t = 0
        while t < T:
            doc = source.next()[: T - t]
            tokens[b, t : t + len(doc)] = doc
            starts[b, t] = t > 0
            t += len(doc)
    return tokens, starts


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "small", "b1"], default="tiny")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--num-kv-heads", type=int)
    ap.add_argument("--loss-chunk-size", type=int)
    ap.add_argument("--sp", type=int, default=None, help="sequence-parallel size (default: world size)")
    ap.add_argument("--dp-mode", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--sp-strategy", choices=["ring", "allgather", "scan", "auto"], default="ring",
                    help="how the layers pass states across the sp group (LaspConfig.sp_strategy)")
    ap.add_argument("--seq-len", type=int, default=256, help="global sequence length (split over sp)")
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per dp replica per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0: off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 master weights")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing of every layer")
    ap.add_argument("--compile", action="store_true",
                    help="LaspConfig.compile: torch.compile each layer's per-token stages and the loss chunks")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    ap.add_argument("--loss-log", help="rank 0 writes {'config', 'losses'} JSON here")
    ap.add_argument("--compare-sp1-log", help="a --loss-log of an sp=1 run with the same seed: compare and fail on mismatch")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss difference accepted")
    ap.add_argument("--plot", help="PNG of the loss curve(s) (needs matplotlib)")
    ap.add_argument("--convergence-check", action="store_true",
                    help="not under torchrun: run sp=1 and sp=--sp with the same seed, compare, write JSON + PNG")
    ap.add_argument("--noise-ref", action="store_true",
                    help="with --convergence-check: also train sp=1 in fp32 and accept differences up to 2x the "
                         "bf16-vs-fp32 difference (floor: --tolerance)")
    ap.add_argument("--out-dir", default="runs/convergence", help="where --convergence-check writes its files")
    ap.add_argument("--timeout", type=int, default=600, help="process-group timeout, seconds")
    ap.add_argument("--pack", action="store_true", help="pack documents into the rows (see above)")
    ap.add_argument("--data", help="with --pack: a tokenized text file, one document per line")
    ap.add_argument("--max-doc-len", type=int, default=96, help="with --pack, synthetic documents: longest length")
    return ap.parse_args(argv)


def build_config(args):
    lasp = _import_lasp()
    cfg = getattr(lasp.models.LaspConfig, args.preset)()
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "loss_chunk_size"):
        val = getattr(args, key)
        if val is not None:
            setattr(cfg, key, val)
    cfg.checkpoint_layers = args.checkpoint
    cfg.compile = args.compile
    cfg.sp_strategy = args.sp_strategy
    return cfg


def compare_losses(a, b):
    worst = 0.0
    for x, y in zip(a, b):
        worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst


def plot_curves(path, curves: dict, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot written to {path}", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), ys, label=name, marker="." if len(ys) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def memory_str(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    import resource

    return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def train(args) -> int:
    lasp = _import_lasp()
    from lasp import distributed as ldist

    device_type = args.device
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = args.sp or world
    if world % sp != 0:
        raise SystemExit(f"train.py: world size {world} is not a multiple of --sp {sp}")
    mesh = ldist.init_mesh(sp=sp, device_type=device_type)
    dp = world // sp
    sp_group, dp_group = ldist.sp_group(mesh), ldist.dp_group(mesh)
    sp_rank, dp_rank = dist.get_rank(sp_group), dist.get_rank(dp_group)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    if args.seq_len < sp:
        raise SystemExit(f"train.py: --seq-len {args.seq_len} is shorter than --sp {sp}")

    cfg = build_config(args)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = lasp.models.LaspForCausalLM(cfg).to(device)
    n_params = model.num_parameters()
    if args.dp_mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        wrapped = model
    elif dp > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, process_group=dp_group, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    lo, hi = ldist.shard_bounds(args.seq_len, sp, sp_rank)  # this rank's piece (for the log line)
    B = args.batch_size
    normaliser = float(B * args.seq_len)  # tokens of one dp replica's batch (no ignored labels here)
    if args.data and not args.pack:
        raise SystemExit("train.py: --data needs --pack")
    # every rank reads the whole global batch's documents in the same order (then takes its rows and piece)
    source = DocumentSource(args.data, args.seed, cfg.vocab_size, args.max_doc_len,
                            progress=rank == 0 and not args.no_progress) if args.pack else None
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    if rank == 0:
        print(f"train.py: {n_params / 1e6:.2f}M params, world {world} = dp {dp} x sp {sp}, dp-mode {args.dp_mode}, "
              f"{device_type} ({backend}), seq {args.seq_len} (local {hi - lo}), batch/dp {B}, "
              f"dtype {args.dtype}, checkpoint {args.checkpoint}, compile {args.compile}", flush=True)
    bar = None
    if rank == 0 and not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=args.steps, desc="train", dynamic_ncols=True)
        except ImportError:
            bar = None
    losses = []
    tokens_per_step = B * dp * args.seq_len
    t_last, tok_since = time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        # The global batch: dp replica d takes rows [d*B, (d+1)*B); sp rank r its piece [lo, hi).
        doc_starts = None
        if source is not None:
            tokens, starts = packed_batch(source, B * dp, args.seq_len)
            tokens, starts = tokens[dp_rank * B:(dp_rank + 1) * B], starts[dp_rank * B:(dp_rank + 1) * B]
            targets = tokens[:, 1:].masked_fill(starts[:, 1:], -100)  # no label across a document boundary
            normaliser = float((targets != -100).sum().clamp_min(1))  # valid labels of this replica's batch
            doc_starts = ldist.split_sequence(starts[:, :-1], sp_group).to(device)
        else:
            tokens = synthetic_batch(args.seed, step, B * dp, args.seq_len, cfg.vocab_size)[dp_rank * B:(dp_rank + 1) * B]
            targets = tokens[:, 1:]
        ids = ldist.split_sequence(tokens[:, :-1], sp_group).to(device)
        labels = ldist.split_sequence(targets, sp_group).to(device)
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = wrapped(ids, labels, sp_group=sp_group, loss_normalizer=normaliser, doc_starts=doc_starts)
        out.loss.backward()
        ldist.allreduce_grads(model.parameters(), sp_group)  # DDP/FSDP already reduced over dp
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        loss = out.loss.detach().float().clone()
        dist.all_reduce(loss)  # sum over sp of the replica means, summed over dp
        loss = loss.item() / dp
        losses.append(loss)
        tok_since += tokens_per_step
        if rank == 0:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if (step + 1) % args.log_every == 0 or step == args.steps - 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                msg = (f"step {step + 1}/{args.steps} loss {loss:.6f} lr {lr_at(step):.2e} "
                       f"tokens/s {tok_since / (now - t_last):,.0f} mem {memory_str(device)}")
                (bar.write if bar is not None else print)(msg)
                sys.stdout.flush()
                t_last, tok_since = now, 0
    if bar is not None:
        bar.close()

    rc = 0
    if rank == 0:
        record = {"config": cfg.to_dict(), "args": vars(args), "world": world, "dp": dp, "sp": sp, "losses": losses}
        if args.loss_log:
            os.makedirs(os.path.dirname(os.path.abspath(args.loss_log)), exist_ok=True)
            with open(args.loss_log, "w") as f:
                json.dump(record, f, indent=1)
        curves = {f"dp{dp} x sp{sp}": losses}
        if args.compare_sp1_log:
            with open(args.compare_sp1_log) as f:
                base = json.load(f)["losses"]
            n = min(len(base), len(losses))
            worst = compare_losses(losses[:n], base[:n])
            ok = worst <= args.tolerance and n == len(losses)
            print(f"compare with sp=1 log ({n} steps): largest relative loss difference {worst:.3e} "
                  f"-> {'OK' if ok else 'MISMATCH'}", flush=True)
            curves["sp1"] = base
            rc = 0 if ok else 1
        if args.plot:
            plot_curves(args.plot, curves, f"{cfg.hidden_size}x{cfg.num_layers} seq {args.seq_len}")
    rc_t = torch.tensor([rc], dtype=torch.int64, device=device)
    dist.broadcast(rc_t, 0)  # every rank exits with rank 0's verdict
    dist.destroy_process_group()
    return int(rc_t.item())


def rel_diffs(a, b):
    """|a_t - b_t| / |b_t| per step."""
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


def plot_convergence(path, curves: dict, diffs: dict, title: str) -> bool:
    """Loss curves (left) and per-step relative differences (right, log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot written to {path}", file=sys.stderr)
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), ys, label=name, linewidth=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    for name, ys in diffs.items():
        bx.plot(range(len(ys)), [max(y, 1e-9) for y in ys], label=name, linewidth=1.0)
    bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel("|relative loss difference|")
    bx.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def convergence_check(args, argv) -> int:
    """Run torchrun with sp=1 then with sp=--sp (same seed), compare and plot; with --noise-ref also
    sp=1 in float32, whose difference from sp=1 in --dtype sets the tolerance (2x, floor --tolerance)."""
    sp = args.sp or 2
    os.makedirs(args.out_dir, exist_ok=True)
    flags = {"--convergence-check", "--noise-ref"}
    valued = {"--sp", "--loss-log", "--compare-sp1-log", "--plot", "--out-dir"}
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=")[0]
        if key in flags:
            continue
        if key in valued:
            skip = "=" not in a
            continue
        rest.append(a)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    runs = [("sp1", 1, []), (f"sp{sp}", sp, [])]
    if args.noise_ref:
        runs.append(("sp1_fp32", 1, ["--dtype", "fp32"]))
    losses, wall = {}, {}
    for name, n, extra in runs:
        log = os.path.join(args.out_dir, f"loss_{name}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.abspath(__file__), *rest, *extra, "--sp", str(n), "--loss-log", log]
        print("+", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env)
        wall[name] = time.perf_counter() - t0
        if r.returncode != 0:
            print(f"convergence check: the {name} run failed (exit code {r.returncode})", flush=True)
            return r.returncode or 1
        with open(log) as f:
            losses[name] = json.load(f)["losses"]
    a, b = losses["sp1"], losses[f"sp{sp}"]
    d_sp = rel_diffs(b, a)
    worst = max(d_sp) if d_sp else 0.0
    tol, noise, d_noise = args.tolerance, None, None
    if args.noise_ref:
        d_noise = rel_diffs(a, losses["sp1_fp32"])
        noise = max(d_noise) if d_noise else 0.0
        tol = max(args.tolerance, 2.0 * noise)
    ok = worst <= tol and len(a) == len(b) == args.steps
    mean = sum(d_sp) / max(1, len(d_sp))
    record = {"losses": losses, "dtype": args.dtype, "sp": sp, "steps": args.steps, "max_rel_diff": worst,
              "mean_rel_diff": mean, "tolerance": tol, "tolerance_floor": args.tolerance, "ok": ok, "wall_s": wall,
              "args": rest}
    if noise is not None:
        record.update(bf16_noise_max_rel=noise, bf16_noise_mean_rel=sum(d_noise) / max(1, len(d_noise)))
    out = os.path.join(args.out_dir, "convergence.json")
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    png = args.plot or os.path.join(args.out_dir, "convergence.png")
    curves = {f"sp=1 {args.dtype}": a, f"sp={sp} {args.dtype}": b}
    diffs = {f"sp={sp} vs sp=1 ({args.dtype})": d_sp}
    if noise is not None:
        curves["sp=1 fp32"] = losses["sp1_fp32"]
        diffs[f"sp=1 {args.dtype} vs sp=1 fp32"] = d_noise
    plotted = plot_convergence(png, curves, diffs, f"same seed, sp=1 vs sp={sp}, {args.dtype}: max rel diff "
                                                   f"{worst:.2e} (tolerance {tol:.2e})")
    extra = f", {args.dtype}-vs-fp32 (sp=1) largest {noise:.3e}" if noise is not None else ""
    print(f"convergence check: sp=1 vs sp={sp} over {len(a)} steps ({args.dtype}): largest relative loss difference "
          f"{worst:.3e}, mean {mean:.3e}{extra}; tolerance {tol:.3e} -> {'OK' if ok else 'MISMATCH'}; "
          f"wrote {out}" + (f" and {png}" if plotted else ""), flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.convergence_check and "RANK" not in os.environ:
        return convergence_check(args, argv)
    return train(args)


if __name__ == "__main__":
    code = main()
    _import_lasp().distributed._end_torchrun_process(code)
