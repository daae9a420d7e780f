"""Worker for the distributed tests: run under torchrun (world N) or imported (world 1).

    torchrun --nproc-per-node 2 tests/train/dist_run.py train --ep 2 --out result.json [...]
    torchrun --nproc-per-node 2 tests/train/dist_run.py experts --out result.json

`train`: a tiny MoE Jamba trained with AdamW on a fixed global batch per step that is split across ranks;
records the global mean loss and the gradient norm of each step; optionally loads a distributed
checkpoint before the first step, saves one again right after loading (to check the round trip) and
saves one after a given step.
`experts`: the expert-parallel module against the single-device `Experts`, outputs and all gradients.
"""

from __future__ import annotations

import argparse
import json

import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.layers.moe import Experts
from openjamba.train.distributed import (all_reduce_mean, cleanup, clip_grad_norm_, init_distributed,
                                         load_distributed_state, parallelize, save_distributed_state)
from openjamba.train.expert_parallel import ExpertParallelExperts

GLOBAL_BATCH, SEQ = 4, 16


def tiny_config():
    return JambaConfig.from_name("jamba-tiny", num_experts=4, num_experts_per_tok=2)


def batch(step: int, vocab: int) -> torch.Tensor:
    """The global batch of a step: identical on every rank and in every world size. Rows come from a
    pool of 8 fixed sequences, so the model can learn them and the loss falls."""
    pool = torch.randint(0, vocab, (8, SEQ), generator=torch.Generator().manual_seed(1000))
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(step))[:GLOBAL_BATCH]
    return pool[rows]


def train(dist, *, steps: int, ep: int = 1, ac: bool = False, shards: int = 2, start: int = 0,
          load: str | None = None, resave: str | None = None, save: str | None = None,
          save_after: int | None = None, clip: float = 1.0) -> dict:
    """Train steps [start, steps); world 1 averages the loss of `shards` slices of the global batch
    (what data parallelism over `shards` ranks computes), world N takes its own slice."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = JambaForCausalLM(cfg).to(dist.device)
    parallelize(model, dist, expert_parallel=ep, activation_checkpointing=ac)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    if load:
        load_distributed_state(model, opt, load, dist)
        if resave:
            save_distributed_state(model, opt, resave, dist)
    losses, norms = [], []
    for step in range(start, steps):
        ids = batch(step, cfg.vocab_size).to(dist.device)
        if dist.world_size == 1:
            parts = ids.chunk(shards)
            loss = sum(model(p, labels=p).loss for p in parts) / len(parts)
        else:
            mine = ids.chunk(dist.world_size)[dist.rank]
            loss = model(mine, labels=mine).loss
        loss.backward()
        norms.append(float(clip_grad_norm_(model, clip, dist)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(all_reduce_mean(loss, dist)))
        if save and save_after == step:
            save_distributed_state(model, opt, save, dist)
    return {"losses": losses, "grad_norms": norms}


def check_experts(dist, T: int = 24, skew: bool = False) -> dict:
    """Max abs differences between EP experts and the single-device module: output, d/dx, d/dw, d/dW.
    With `skew`, every token goes to experts of EP rank 0, so the other ranks receive nothing."""
    X, H, F, K, ep = 4, 16, 24, 2, dist.world_size
    torch.manual_seed(0)
    ref = Experts(X, H, F)
    torch.nn.init.normal_(ref.gate_up_proj, std=0.2)
    torch.nn.init.normal_(ref.down_proj, std=0.2)
    ref = ref.to(dist.device)
    mod = ExpertParallelExperts(ref, torch.distributed.group.WORLD, dist.rank, ep)
    g = torch.Generator().manual_seed(7)
    # Every rank draws everybody's inputs; rank r uses slice r. The reference processes them all at once.
    xs = torch.randn(ep, T, H, generator=g)
    ws = torch.rand(ep, T, K, generator=g)
    hi = X // ep if skew else X
    ids = torch.stack([torch.stack([torch.randperm(hi, generator=g)[:K] for _ in range(T)]) for _ in range(ep)])
    gy = torch.randn(ep, T, H, generator=g)
    xs, ws, ids, gy = (t.to(dist.device) for t in (xs, ws, ids, gy))

    x_ref, w_ref = xs.reshape(ep * T, H).clone().requires_grad_(), ws.reshape(ep * T, K).clone().requires_grad_()
    y_ref = ref(x_ref, w_ref, ids.reshape(ep * T, K))
    (y_ref * gy.reshape(ep * T, H)).sum().backward()

    x, w = xs[dist.rank].clone().requires_grad_(), ws[dist.rank].clone().requires_grad_()
    y = mod(x, w, ids[dist.rank])
    (y * gy[dist.rank]).sum().backward()

    n, r = X // ep, dist.rank
    rows = slice(r * T, (r + 1) * T)
    # EP scales weight gradients by 1/ep so that FSDP's mean over "dp" becomes a mean over all ranks.
    return {
        "out": (y - y_ref[rows]).abs().max().item(),
        "grad_x": (x.grad - x_ref.grad[rows]).abs().max().item(),
        "grad_w": (w.grad - w_ref.grad[rows]).abs().max().item(),
        "grad_gate_up": (mod.gate_up_proj.grad * ep - ref.gate_up_proj.grad[r * n:(r + 1) * n]).abs().max().item(),
        "grad_down": (mod.down_proj.grad * ep - ref.down_proj.grad[r * n:(r + 1) * n]).abs().max().item(),
        "out_scale": y_ref.abs().max().item(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "experts"])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--from-step", type=int, default=0)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--ac", action="store_true")
    p.add_argument("--load")
    p.add_argument("--resave")
    p.add_argument("--save")
    p.add_argument("--save-after", type=int)
    args = p.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
        torch.backends.cudnn.allow_tf32 = False
    dist = init_distributed(args.device)
    if args.what == "train":
        result = train(dist, steps=args.steps, start=args.from_step, ep=args.ep, ac=args.ac, load=args.load,
                       resave=args.resave, save=args.save, save_after=args.save_after)
    else:
        result = {"uniform": check_experts(dist), "skewed": check_experts(dist, skew=True)}
    # One JSON file per rank: `--out` for rank 0, `--out`.rank<r> for the others.
    with open(args.out if dist.is_main else f"{args.out}.rank{dist.rank}", "w") as f:
        json.dump({"world_size": dist.world_size, "rank": dist.rank, **result}, f)
    cleanup(dist)


if __name__ == "__main__":
    main()
