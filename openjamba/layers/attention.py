"""Grouped-query causal self-attention with no positional encoding (Jamba's attention layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)

    def forward(self, x, key_mask=None, cache=None):
        """x: (B, T, H). key_mask: (B, S) bool over every key position (S = cached + T), or None
        when no position is padding. Returns (B, T, H)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update_kv(self.layer_idx, k, v)  # (B, Hkv, start + T, hd)
        S = k.shape[2]
        gqa = self.n_heads != self.n_kv
        if key_mask is None and (start == 0 or T == 1):
            # Plain causal (or a single query that sees every key): the fused kernels' fast path.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            qpos = torch.arange(start, start + T, device=x.device)[:, None]
            kpos = torch.arange(S, device=x.device)[None, :]
            allowed = kpos <= qpos  # (T, S) causal with offset
            if key_mask is not None:
                # A padded query position would see no key at all (NaN): let it see itself.
                allowed = (allowed & key_mask[:, None, :S]) | (kpos == qpos)  # (B, T, S)
                allowed = allowed[:, None]  # (B, 1, T, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
