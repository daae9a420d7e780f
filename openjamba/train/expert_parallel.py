"""Expert parallelism: the experts of each MoE layer split over an expert-parallel (EP) process group.

Each of the `ep` ranks of a group keeps X/ep consecutive experts (rank r owns experts
[r*X/ep, (r+1)*X/ep)). A forward pass:

    1. sorts this rank's T*K (token, expert) assignments by expert id, which also groups them by the
       rank that owns the expert;
    2. exchanges the per-expert counts (all-to-all of X integers), so that every rank knows how many
       rows it will send to and receive from each peer;
    3. dispatches the token rows with an autograd-aware all-to-all;
    4. runs its local experts on what it received (`openjamba.ops.moe_experts`, so the grouped GPU kernel
       is used where there is one);
    5. sends the expert outputs back with the reverse all-to-all, weights them by the router probabilities
       on the token's own rank (so the router gradient stays local) and sums them per token.

`ExpertParallelExperts.forward` has the signature of `layers.moe.Experts.forward`, so the model code does
not change: `apply_expert_parallel` swaps the module in place. Parameter names stay `gate_up_proj` /
`down_proj`; only their first dimension shrinks from X to X/ep.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..layers.moe import Experts, SparseMoE


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertParallelExperts(nn.Module):
    """The local X/ep experts of one MoE layer plus the all-to-all token exchange.

    gate_up_proj: (X/ep, 2F, H), down_proj: (X/ep, H, F) -- slices of the full `Experts` tensors.
    """

    def __init__(self, experts: Experts, group, ep_rank: int, ep_size: int):
        super().__init__()
        X = experts.gate_up_proj.shape[0]
        if X % ep_size:
            raise ValueError(f"expert_parallel={ep_size} must divide num_experts={X}")
        n = X // ep_size
        self.num_experts, self.num_local, self.ep_rank, self.ep_size = X, n, ep_rank, ep_size
        self.group = group
        lo, hi = ep_rank * n, (ep_rank + 1) * n
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[lo:hi].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[lo:hi].clone())

    def extra_repr(self) -> str:
        return f"experts {self.ep_rank * self.num_local}..{(self.ep_rank + 1) * self.num_local - 1} " \
               f"of {self.num_experts}, ep_size={self.ep_size}"

    def forward(self, x_TH, top_w_TK, top_idx_TK):
        """x_TH: (T, H); top_w_TK, top_idx_TK: (T, K) router weights and global expert ids. Returns (T, H)."""
        T, H = x_TH.shape
        K = top_idx_TK.shape[1]
        X, n, ep, g = self.num_experts, self.num_local, self.ep_size, self.group
        flat_idx = top_idx_TK.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)  # grouped by expert => grouped by owner rank
        token_of = order // K

        # Counts first: every rank learns how many rows per local expert each peer will send.
        send_counts_X = torch.bincount(flat_idx, minlength=X)  # (X,) = (ep, n) row-major
        recv_counts_X = torch.empty_like(send_counts_X)
        dist.all_to_all_single(recv_counts_X, send_counts_X, group=g)  # equal splits of n counts each
        # One host sync for both split lists: the collectives need Python ints.
        splits = torch.stack([send_counts_X.view(ep, n).sum(1), recv_counts_X.view(ep, n).sum(1)]).tolist()
        send_splits, recv_splits = splits

        x_send = x_TH[token_of]  # (T*K, H)
        x_recv = _AllToAll.apply(x_send, recv_splits, send_splits, g)  # (R, H) by source, then expert

        # Local expert id of every received row: counts are (source rank, local expert) row-major.
        local_ids = torch.arange(n, device=x_TH.device).repeat(ep)
        idx_R1 = torch.repeat_interleave(local_ids, recv_counts_X, output_size=sum(recv_splits)).unsqueeze(1)
        ones_R1 = x_recv.new_ones(idx_R1.shape[0], 1)
        # Tokens from the whole EP group reach these weights; FSDP then averages over the data-parallel
        # ranks only, so 1/ep makes the expert gradient the mean over all ranks like every other gradient.
        w_gate_up = _ScaleGrad.apply(self.gate_up_proj, 1.0 / ep)
        w_down = _ScaleGrad.apply(self.down_proj, 1.0 / ep)
        y_recv = ops.moe_experts(x_recv, ones_R1, idx_R1, w_gate_up, w_down)
        if y_recv.shape[0] == 0:
            # Nothing routed here: keep both all-to-alls and the weights in the autograd graph, so that
            # this rank joins the backward collectives its peers are waiting on and its weights get a
            # (zero) gradient like on every other rank.
            y_recv = y_recv + 0.0 * (x_recv.sum() + w_gate_up.sum() + w_down.sum()).to(y_recv.dtype)

        y_send = _AllToAll.apply(y_recv, send_splits, recv_splits, g)  # (T*K, H) back in `order`
        y_send = y_send * top_w_TK.reshape(-1)[order, None].to(y_send.dtype)
        return torch.zeros_like(x_TH).index_add(0, token_of, y_send.to(x_TH.dtype))


def moe_layers(model) -> list[SparseMoE]:
    """The SparseMoE blocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def apply_expert_parallel(model, group, ep_rank: int, ep_size: int) -> int:
    """Replace `experts` of every MoE layer by its EP shard. All ranks must hold the same full weights
    (same seed or the same checkpoint) before this call. Returns the number of layers converted."""
    layers = moe_layers(model)
    for moe in layers:
        if isinstance(moe.experts, ExpertParallelExperts):
            raise RuntimeError("expert parallelism is already applied to this model")
        moe.experts = ExpertParallelExperts(moe.experts, group, ep_rank, ep_size)
    return len(layers)


def ep_modules(model) -> dict[str, ExpertParallelExperts]:
    """{module name: EP experts module} for every expert-parallel layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}
