"""Mixture of experts: softmax router, top-k without renormalisation, SwiGLU experts in 3-D weights."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


class Experts(nn.Module):
    """All experts' weights in two 3-D tensors, ready for a grouped matmul.

    gate_up_proj: (X, 2F, H), gate rows first;  down_proj: (X, H, F). (transformers v5's in-memory layout;
    checkpoints on disk use per-expert tensors and are converted on load/save.)
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_TH, top_w_TK, top_idx_TK):
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        device = x_TH.device.type
        if torch.is_autocast_enabled(device):
            # The experts are matmuls: under autocast they run in its dtype, as nn.Linear does (fp32 master
            # weights would otherwise send the grouped GEMM to a slow fp32 path). Gradients reach the fp32
            # weights through the casts.
            dtype = torch.get_autocast_dtype(device)
            x_TH, top_w_TK = x_TH.to(dtype), top_w_TK.to(dtype)
            w_gate_up, w_down = w_gate_up.to(dtype), w_down.to(dtype)
        return ops.moe_experts(x_TH, top_w_TK, top_idx_TK, w_gate_up, w_down)


class SparseMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.intermediate_size)

    def forward(self, x):
        """x: (B, T, H). Returns (out (B, T, H), router probs (B*T, X) fp32, top-k ids (B*T, K))."""
        B, T, H = x.shape
        x_TH = x.reshape(-1, H)
        probs = torch.softmax(self.router(x_TH).float(), dim=-1)  # (BT, X)
        top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)  # not renormalised (Jamba)
        out = self.experts(x_TH, top_w.to(x.dtype), top_idx)
        return out.view(B, T, H), probs, top_idx


def load_balancing_loss(stats, num_experts: int, mask=None):
    """Switch-style auxiliary loss pooled over all MoE layers and tokens.

    stats: list of (probs (BT, X), top_idx (BT, K)) per MoE layer; mask: (B, T) bool or None.
    aux = X * sum_e f_e * P_e with f_e = top-k assignments to e per token (sums to K, as transformers
    computes it) and P_e = mean router probability of e; padding is excluded.
    """
    if not stats:
        return None
    device = stats[0][0].device
    counts = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    w = None if mask is None else mask.reshape(-1).to(device=device, dtype=torch.float32)
    for probs, idx in stats:
        K = idx.shape[1]
        if w is None:
            counts = counts.scatter_add(0, idx.reshape(-1), torch.ones(idx.numel(), device=device))
            prob_sum = prob_sum + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            counts = counts.scatter_add(0, idx.reshape(-1), w.repeat_interleave(K))
            prob_sum = prob_sum + (probs * w[:, None]).sum(0)
            rows = rows + w.sum()
    rows = rows.clamp(min=1)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
