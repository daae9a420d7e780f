"""Grouped-query causal self-attention with no positional encoding (Jamba's attention layers).

`forward` is the eager path (python-int cache position, any number of new tokens, padding masks).
`forward_static` is the one-token decoding step for CUDA graphs: position held in a device tensor,
attention over the whole preallocated cache with a position mask, fixed shapes, no host reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right


def _flash_takes_gqa(q, k, v) -> bool:
    """True where SDPA's lower-right causal route will run the flash kernel on grouped K/V as they are
    (CUDA, 16-bit); on the CPU the route materialises the mask and handles GQA itself."""
    if not q.is_cuda:
        return True
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True))


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
        elif key_mask is None:
            # A chunk of T queries after `start` cached keys (chunked prefill): causal aligned to the lower
            # right. CausalBias runs the flash / memory-efficient kernels without materialising a (T, S)
            # mask, which at a 1M-token context would be gigabytes per chunk. Flash reads grouped K/V
            # directly; the memory-efficient kernel needs equal head counts, so for it K/V are expanded.
            if gqa and not _flash_takes_gqa(q, k, v):
                rep = self.n_heads // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                gqa = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=gqa)
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

    def forward_static(self, x, cache):
        """One decoding token per row at the cache's device position `cache.pos`.

        x: (B, 1, H). K/V are written with index_copy_ at `pos`; the query attends to every buffer slot
        with a mask (real token and position <= pos), so the work and shapes depend on the cache size, not
        on how full it is: the step can be captured once in a CUDA graph and replayed at every position.
        The scores are a plain batched matmul over the whole buffer (split across all SMs by cuBLAS);
        a single-query fused kernel would give each (batch, head) one thread block. Returns (B, 1, H).
        """
        B = x.shape[0]
        G = self.n_heads // self.n_kv
        q = self.q_proj(x).view(B, self.n_kv, G, self.head_dim)  # (B, Hkv, G, hd): query heads grouped per KV head
        k = self.k_proj(x).view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, 1, hd)
        v = self.v_proj(x).view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
        keys, values = cache.write_kv_at_pos(self.layer_idx, k, v)  # (B, Hkv, L, hd)
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.head_dim ** -0.5  # (B, Hkv, G, L)
        allowed = cache.static_key_mask()[:, None, None, :]  # (B, 1, 1, L)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # (B, Hkv, G, hd)
        return self.o_proj(out.reshape(B, 1, self.n_heads * self.head_dim))
