"""HybridCache: preallocated decoding state for a Jamba model.

Attention layers keep K and V for up to `max_length` positions, (B, Hkv, max_length, hd), written in place;
Mamba layers keep a conv state (B, K-1, Di) of the last conv inputs and an SSM state (B, Di, N) in fp32,
updated in place. Nothing grows with torch.cat, so the buffers' addresses never change.
`key_mask` (B, max_length) records which cached positions are real tokens (False = left padding); a model
without attention layers reads no keys and keeps it (and `positions`) empty, (B, 0).

Two ways to advance it:
- eager: `length` is a python int; any number of new tokens is written at [length, length + T).
- static (for CUDA graphs): `pos` is a (1,) long tensor on the cache's device that mirrors `length`;
  a one-token step writes K/V with `index_copy_` at `pos` and attends over the whole buffer with
  `static_key_mask()`, so shapes and addresses never change and nothing reads back to the host.
  `sync_position()` copies `length` into `pos` (after an eager prefill); the step itself increments `pos`
  on the device and the caller advances `length` by one per step.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class HybridCache:
    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"cache needs batch_size > 0 and max_length > 0, got {batch_size}, {max_length}")
        self.batch_size, self.max_length = batch_size, max_length
        self.dtype = dtype
        self.length = 0  # positions already processed (the same for every row: padding is on the left)
        hd, kv = config.head_dim, config.num_key_value_heads
        Di, N, K = config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv
        self.key: dict[int, torch.Tensor] = {}
        self.value: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        for i in config.attention_layer_ids:
            self.key[i] = torch.zeros(batch_size, kv, max_length, hd, device=device, dtype=dtype)
            self.value[i] = torch.zeros(batch_size, kv, max_length, hd, device=device, dtype=dtype)
        for i in config.mamba_layer_ids:
            self.conv[i] = torch.zeros(batch_size, K - 1, Di, device=device, dtype=dtype)
            self.ssm[i] = torch.zeros(batch_size, Di, N, device=device, dtype=torch.float32)
        # which key positions are real tokens, and their indices for the static step's mask: 9 bytes per
        # position, allocated only where attention layers read keys
        keys = max_length if config.attention_layer_ids else 0
        self.key_mask = torch.ones(batch_size, keys, device=device, dtype=torch.bool)
        self.has_padding = False
        self.pos = torch.zeros(1, device=device, dtype=torch.long)  # device mirror of `length`
        self.positions = torch.arange(keys, device=device)  # (max_length,) or (0,), for the static mask

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise CacheFullError(
                f"cache holds {self.length} of {self.max_length} positions; {new_tokens} more do not fit "
                f"(make the cache with a larger max_length)")

    def update_kv(self, layer_idx: int, k, v):
        """Write k, v (B, Hkv, T, hd) at the current position; return all keys and values so far."""
        T = k.shape[2]
        end = self.length + T
        self.key[layer_idx][:, :, self.length:end] = k
        self.value[layer_idx][:, :, self.length:end] = v
        return self.key[layer_idx][:, :, :end], self.value[layer_idx][:, :, :end]

    def record_mask(self, mask, T: int):
        """Store the (B, T) mask of the new tokens; return the (B, length+T) key mask or None if no padding
        (always None without attention layers: nothing reads keys)."""
        if mask is not None and not bool(mask.all()):
            self.has_padding = True
        if self.key_mask.shape[1] == 0:
            return None
        self.key_mask[:, self.length:self.length + T] = mask if mask is not None else True
        return self.key_mask[:, :self.length + T] if self.has_padding else None

    def advance(self, T: int) -> None:
        self.length += T

    # ------------------------------------------------------------------ static (graph-capturable) path
    def sync_position(self) -> None:
        """Copy the host `length` into the device tensor `pos` (no device-to-host read)."""
        self.pos.fill_(self.length)

    def write_kv_at_pos(self, layer_idx: int, k, v):
        """Write one token's k, v (B, Hkv, 1, hd) at position `pos`; return the full (B, Hkv, max_length, hd)
        buffers. index_copy_ takes the position as a tensor, so a captured graph replays it at a new place."""
        self.key[layer_idx].index_copy_(2, self.pos, k)
        self.value[layer_idx].index_copy_(2, self.pos, v)
        return self.key[layer_idx], self.value[layer_idx]

    def static_key_mask(self):
        """(B, max_length) bool: real tokens at positions <= pos (the query's own position included)."""
        return self.key_mask & (self.positions <= self.pos)

    def reset(self) -> None:
        self.length = 0
        self.has_padding = False
        self.pos.zero_()
        self.key_mask.fill_(True)
        for t in (*self.conv.values(), *self.ssm.values()):
            t.zero_()

    def nbytes(self) -> dict[str, int]:
        kv = sum(t.numel() * t.element_size() for t in (*self.key.values(), *self.value.values()))
        conv = sum(t.numel() * t.element_size() for t in self.conv.values())
        ssm = sum(t.numel() * t.element_size() for t in self.ssm.values())
        return {"kv": kv, "conv": conv, "ssm": ssm, "total": kv + conv + ssm}
