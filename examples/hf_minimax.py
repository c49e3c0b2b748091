"""Fine-tune a tiny HuggingFace MiniMax with its sequence split over the ranks of a torchrun job, on lasp.

    torchrun --standalone --nproc_per_node 2 examples/hf_minimax.py

Every rank builds the same MiniMaxForCausalLM (random init from a small config, no download) and the same
synthetic data. `lasp.integrations.hf.patch_minimax(model, sp_group)` runs its linear-attention layers
through lasp's state ring and makes its full-attention layers all-gather K and V; rank r feeds the r-th
contiguous piece of every sequence (position ids default to the global positions). The loss of a sequence
is the sum of the pieces' losses (targets shifted over the whole sequence, so the last token of a piece
predicts the first of the next), and gradients are all-reduced (summed) over the group, so every rank takes
the step of the unsplit model. With --compare (default) every rank also trains an unpatched copy on the
whole sequence, prints both losses, and fails if they drift apart by more than --tolerance.

NCCL with one GPU per rank where there are enough GPUs, Gloo on the CPU otherwise. Needs
transformers==5.17.0.
"""
import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp
from lasp.integrations.hf import patch_minimax


def make_model(args, device):
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    layer_types = ["linear_attention" if (i + 1) % args.full_every else "full_attention" for i in range(args.layers)]
    cfg = MiniMaxConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, layer_types=layer_types,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4, intermediate_size=2 * args.hidden,
        num_local_experts=2, num_experts_per_tok=2, max_position_embeddings=max(4096, args.seq_len),
        block_size=64, use_cache=False, experts_implementation="eager",
    )
    torch.manual_seed(args.seed)
    return MiniMaxForCausalLM(cfg).to(device).train(), layer_types


def batch(args, step, device):
    """Synthetic sequences with a learnable rule: t[i+1] = (a * t[i] + c) mod vocab, a random start per row."""
    g = torch.Generator().manual_seed(args.seed * 1000 + step)
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    a, c = 5, 3
    toks = [start]
    for _ in range(args.seq_len):
        toks.append((a * toks[-1] + c) % args.vocab)
    return torch.cat(toks, 1).to(device)  # (B, N + 1): inputs [:, :N], targets [:, 1:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=203, help="tokens per sequence, split over the ranks")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--full-every", type=int, default=2, help="every k-th layer is full softmax attention")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compare", dest="compare", action="store_false", help="skip the unsplit reference model")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest relative loss difference allowed")
    args = ap.parse_args()

    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    if use_nccl:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    # NCCL: bind the process group to this rank's GPU (barriers and destroy then know the device)
    dist.init_process_group("nccl" if use_nccl else "gloo", **(dict(device_id=device) if use_nccl else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD

    model, layer_types = make_model(args, device)
    reference = copy.deepcopy(model) if args.compare else None  # unpatched, trains on the whole sequence
    patch_minimax(model, sp_group=group)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr) if args.compare else None

    N = args.seq_len
    lengths = [N // world + (r < N % world) for r in range(world)]
    P, n = sum(lengths[:rank]), lengths[rank]
    if rank == 0:
        print(f"MiniMax {layer_types}, {N} tokens per sequence split {lengths} over {world} ranks "
              f"({'nccl' if use_nccl else 'gloo'} on {device.type})", flush=True)

    worst = 0.0
    for step in range(args.steps):
        toks = batch(args, step, device)
        inputs, targets = toks[:, :N], toks[:, 1:]

        logits = model(inputs[:, P : P + n]).logits  # this rank's piece; global positions by default
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, P : P + n].flatten(), reduction="sum")
        loss = loss_sum / (args.batch * N)  # this rank's share of the mean over the whole batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # replicated parameters: sum the pieces' gradients
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)

        line = f"step {step}: loss split over {world} ranks {total.item():.6f}"
        if args.compare:
            ref_loss = F.cross_entropy(reference(inputs).logits.flatten(0, 1).float(), targets.flatten())
            ref_opt.zero_grad(set_to_none=True)
            ref_loss.backward()
            ref_opt.step()
            diff = abs(total.item() - ref_loss.item()) / abs(ref_loss.item())
            worst = max(worst, diff)
            line += f"   unsplit {ref_loss.item():.6f}   rel diff {diff:.2e}"
        if rank == 0:
            print(line, flush=True)

    ok = not args.compare or worst <= args.tolerance
    if rank == 0 and args.compare:
        print(f"hf_minimax on {device.type} ({'nccl' if use_nccl else 'gloo'}), {world} ranks: largest relative "
              f"loss difference {worst:.2e} -> {'OK' if ok else 'FAIL'}", flush=True)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
    lasp.distributed._end_torchrun_process(0)
