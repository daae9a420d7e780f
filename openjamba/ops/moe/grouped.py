"""Mixture-of-experts FFN with grouped matmuls: same contract and results as `moe_experts_ref`.

    x_TH: (T, H)    top_w_TK, top_idx_TK: (T, K)    w_gate_up_XFH: (X, 2F, H)    w_down_XHF: (X, H, F)

The T*K (token, expert) assignments are placed so each expert's rows are contiguous, every expert
runs in ONE `torch._grouped_mm` per projection, and the results are un-permuted and weighted. All
index arithmetic stays on the device: no `.tolist()`, no host sync, no Python loop over experts, so
the layer can be captured in a CUDA graph. The gated activation between the two matmuls is one Triton
kernel each way on CUDA (ops/moe/swiglu.py). Each expert's group is padded to a multiple of ALIGN rows
inside a buffer of a size known without looking at the routing (T*K + X*(ALIGN-1) rows),
which keeps every group offset aligned as the CUDA kernels of `_grouped_mm` require. Autograd runs
through `_grouped_mm`, so x, both weight tensors and the router weights get gradients.

Requirements: on CUDA use bf16 (the dtype torch's grouped GEMM kernels are built for, and the only one
tested there; whether fp32/fp16 run depends on the torch version); H and F must be multiples of 8
(16-byte rows). The forward combine is a sum over the K slots of each token, not an atomic scatter,
so the output is deterministic.
"""

from __future__ import annotations

import torch

from .swiglu import swiglu

ALIGN = 16


def _grouped_mm(a, b, offs):
    """(P, k) x (X, k, n) with row groups ending at offs -> (P, n)."""
    return torch._grouped_mm(a, b, offs=offs)


def moe_experts_grouped(x_TH, top_w_TK, top_idx_TK, w_gate_up_XFH, w_down_XHF):
    """Run the routed experts; returns (T, H) in x's dtype. See the module docstring."""
    T, H = x_TH.shape
    K = top_idx_TK.shape[1]
    X = w_gate_up_XFH.shape[0]
    dev = x_TH.device
    n_assign = T * K
    P = n_assign + X * (ALIGN - 1)  # rows of the padded buffer: enough for any routing

    flat = top_idx_TK.reshape(-1)
    # rank of each assignment among its expert's, in token order (what a stable sort by expert gives),
    # from a running count over the one-hot routing: a scan of T*K x X small integers instead of a sort,
    # whose radix passes would each add kernels and memsets
    onehot = (flat[:, None] == torch.arange(X, device=dev)).to(torch.int32)  # (T*K, X); no range check (sync)
    seen = torch.cumsum(onehot, 0, dtype=torch.int32)  # assignments to each expert up to and including this one
    counts = seen[-1].long() if n_assign else flat.new_zeros(X)
    rank_in_expert = (seen * onehot).sum(1) - 1
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    # the last group also owns the unused tail of the buffer, so the offsets end at P
    offs = torch.cat([pad_end[:-1], pad_end.new_full((1,), P)]).to(torch.int32)
    pos = pad_start[flat] + rank_in_expert  # padded row of assignment a = (token a // K, slot a % K)

    # token feeding each padded row; padding rows read token 0: their outputs are never gathered back,
    # so they get no gradient and add nothing to the weight gradients (their upstream gradient is 0)
    src = torch.zeros(P, device=dev, dtype=torch.long)
    src[pos] = torch.arange(n_assign, device=dev) // K
    x_pad = x_TH[src]  # (P, H)
    gate_up = _grouped_mm(x_pad, w_gate_up_XFH.transpose(-2, -1), offs)  # (P, 2F)
    y_pad = _grouped_mm(swiglu(gate_up), w_down_XHF.transpose(-2, -1), offs)  # (P, H)
    y_TKH = y_pad[pos].view(T, K, H)
    return (y_TKH * top_w_TK[..., None].to(y_TKH.dtype)).sum(1).to(x_TH.dtype)
