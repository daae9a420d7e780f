"""Causal depthwise conv1d, pure PyTorch (the specification).

    x: (B, L, D) channel-last      weight: (D, K)      bias: (D,) or None
    initial_state: (B, K-1, D), the K-1 inputs before x (zeros when None)
    y_t = act(bias + sum_k weight[:, k] * x_{t-K+1+k});   final_state: the last K-1 inputs, (B, K-1, D)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t):
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so tests can compare tightly)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def causal_conv1d_ref(x, weight, bias=None, activation: str | None = "silu", initial_state=None):
    """Returns (y, final_state); y in x's dtype, computed in fp32."""
    batch, L, D = x.shape
    K = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, K - 1, D)
    xp = torch.cat([initial_state.to(x.dtype), x], dim=1)  # (B, K-1+L, D)
    acc = _acc(x)
    w = weight.to(acc)
    y = xp[:, 0:L].to(acc) * w[:, 0]
    for k in range(1, K):  # K is 4: a loop over taps, not time
        y = y + xp[:, k:k + L].to(acc) * w[:, k]
    if bias is not None:
        y = y + bias.to(acc)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    return y.to(x.dtype), xp[:, L:].clone() if K > 1 else xp[:, :0]


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation: str | None = "silu"):
    """One token through the causal conv. x: (B, D); conv_state: (B, K-1, D), shifted in place."""
    K = weight.shape[1]
    acc = _acc(x)
    window = torch.cat([conv_state.to(acc), x.to(acc)[:, None]], dim=1)  # (B, K, D)
    y = (window * weight.to(acc).t()[None]).sum(1)
    if bias is not None:
        y = y + bias.to(acc)
    if activation == "silu":
        y = F.silu(y)
    if K > 1:
        conv_state.copy_(window[:, 1:].to(conv_state.dtype))
    return y.to(x.dtype)
