"""Mixture-of-experts FFN, pure PyTorch: the specification.

    x_TH: (T, H) tokens       top_w_TK, top_idx_TK: (T, K) router weights and expert ids
    w_gate_up_XFH: (X, 2F, H) gate rows first, then up rows       w_down_XHF: (X, H, F)
    out_t = sum_k top_w[t, k] * down_e(silu(gate_e x_t) * up_e x_t),   e = top_idx[t, k]

Tokens are sorted by expert so each expert runs one matmul over its tokens; the loop over experts
is the reference (the GPU path runs all experts in one grouped matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts_ref(x_TH, top_w_TK, top_idx_TK, w_gate_up_XFH, w_down_XHF):
    T, H = x_TH.shape
    K = top_idx_TK.shape[1]
    X = w_gate_up_XFH.shape[0]
    flat_idx = top_idx_TK.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)  # assignments grouped by expert
    token_of = order // K
    counts = torch.bincount(flat_idx, minlength=X).tolist()
    x_sorted = x_TH[token_of]
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            xe = x_sorted[start:start + n]
            gate, up = F.linear(xe, w_gate_up_XFH[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w_down_XHF[e]))
        start += n
    y_sorted = torch.cat(outs) if outs else x_TH.new_zeros(0, H)
    y_sorted = y_sorted * top_w_TK.reshape(-1)[order, None].to(y_sorted.dtype)
    out = torch.zeros_like(x_TH)
    return out.index_add(0, token_of, y_sorted.to(x_TH.dtype))
