"""The main job in miniature: a tiny linear-attention language model trained for a few steps with its
sequence split over the ranks of a torchrun job (LASP), beside the same model run on the whole sequence.

    torchrun --standalone --nproc_per_node 2 examples/demo.py

Uses NCCL and one GPU per rank where there are enough GPUs, Gloo on the CPU otherwise. Every rank builds
the same model and data from one seed; rank r holds the r-th piece of each sequence. The split model's
loss is the sum of the pieces' losses; its gradients are summed over the group (all-reduce), so it takes
exactly the steps of the unsplit model, which every rank also runs on the whole sequence to compare.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import lasp


class Block(nn.Module):
    def __init__(self, dim, heads, slopes):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.register_buffer("decay", slopes)

    def forward(self, x, group):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).unbind(2)
        q, k = F.silu(q), F.silu(k)  # a positive feature map, as TransNormerLLM-style models use
        o = lasp.lasp_attention(q, k, v, self.decay, group=group, layout="bnhd")
        x = x + self.out(o.reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, lasp.alibi_slopes(heads)) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, group=None):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, group)
        return self.head(self.norm(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss difference accepted")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dtype = torch.float32

    torch.manual_seed(0)
    split_model = TinyLM().to(device, dtype)
    whole_model = TinyLM().to(device, dtype)
    whole_model.load_state_dict(split_model.state_dict())
    opt_split = torch.optim.AdamW(split_model.parameters(), lr=3e-3)
    opt_whole = torch.optim.AdamW(whole_model.parameters(), lr=3e-3)

    # This rank's piece of each sequence (uneven when seq_len is not a multiple of the world size).
    bounds = [round(i * args.seq_len / world) for i in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(args.steps):
        # Synthetic data with structure: each sequence repeats a random motif, so the loss can fall.
        motif = torch.randint(0, 64, (args.batch, 16), generator=gen)
        tokens = motif.repeat(1, args.seq_len // 16 + 2)[:, : args.seq_len + 1].to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        n_total = targets.numel()

        # Split: this rank's piece, the state ring inside every lasp_attention call.
        logits = split_model(inputs[:, lo:hi], group=dist.group.WORLD)
        loss_piece = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, lo:hi].flatten(), reduction="sum") / n_total
        opt_split.zero_grad()
        loss_piece.backward()
        for p in split_model.parameters():
            dist.all_reduce(p.grad)
        opt_split.step()
        loss_split = loss_piece.detach().clone()
        dist.all_reduce(loss_split)

        # Unsplit: the same model on the whole sequence, no communication.
        logits = whole_model(inputs)
        loss_whole = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        opt_whole.zero_grad()
        loss_whole.backward()
        opt_whole.step()

        diff = abs(loss_split.item() - loss_whole.item()) / abs(loss_whole.item())
        worst = max(worst, diff)
        if rank == 0:
            print(f"step {step}: loss split over {world} ranks {loss_split.item():.6f}   "
                  f"unsplit {loss_whole.item():.6f}   rel diff {diff:.2e}", flush=True)

    ok = worst <= args.tolerance
    if rank == 0:
        print(f"demo on {device.type} ({'nccl' if use_cuda else 'gloo'}), {world} ranks: "
              f"largest relative loss difference {worst:.2e} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
    lasp.distributed._end_torchrun_process(0)
