"""Memory planning: will (config, dtype, batch, context, prefill chunk) fit, decided before allocating.

    total = weights + step copies + KV cache + Mamba state + max(prefill activation peak, decode workspace)
            + reserve

- weights: every parameter (all experts are resident).
- KV cache and Mamba state: exactly what HybridCache allocates (plus its key mask).
- prefill peak: one chunk of `chunk_size` tokens per row through the most memory-hungry layer. Layers run
  one after another under inference mode, so only one layer's temporaries are alive at a time. The terms
  are upper-bound estimates of the PyTorch reference paths (the fused kernels need less); the memory
  benchmark prints them next to torch.cuda.max_memory_allocated. Left unset, the chunk is the largest
  power of two from DEFAULT_CHUNK down to MIN_CHUNK whose plan fits the budget: large batches prefill in
  shorter chunks instead of being refused.
- decode workspace: attention scores over the whole cache, logits, MoE temporaries of one step.
- step copies: at one row, the fused step's transposed copies of its split layers' last projections
  (fused.SPLIT_DEFAULT: the Mamba mixers' out_proj) and its folded routers' tables (fused.FOLD_DEFAULT),
  resident beside the weights.
- reserve: allocator slack and library workspaces (cuBLAS, CUDA graph pools): a fixed amount plus a fraction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..memory import format_bytes as _format_bytes
from . import fused
from .fused import GEMV_MAX_ROWS, SPLIT_DEFAULT


def format_bytes(n: float) -> str:
    """Binary units with two decimals: 1610612736 -> '1.50 GiB'."""
    return _format_bytes(n, decimals=2)


RESERVE_FIXED = 512 * 2 ** 20
RESERVE_FRACTION = 0.05
DEFAULT_CHUNK = 8192  # prefill tokens per row and chunk, where it fits
MIN_CHUNK = 64


class DoesNotFit(MemoryError):
    """The requested generation would not fit in the memory budget; the message names the numbers."""


@dataclass
class MemoryPlan:
    weights: int
    kv_cache: int
    mamba_state: int
    prefill_peak: int
    decode_workspace: int
    reserve: int
    budget: int | None
    detail: dict = field(default_factory=dict)
    step_copies: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.step_copies + self.kv_cache + self.mamba_state
                + max(self.prefill_peak, self.decode_workspace) + self.reserve)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def describe(self) -> str:
        d = self.detail
        parts = [f"weights {format_bytes(self.weights)}", f"KV cache {format_bytes(self.kv_cache)}",
                 f"Mamba state {format_bytes(self.mamba_state)}",
                 f"prefill peak {format_bytes(self.prefill_peak)} (chunk {d.get('chunk_size')})",
                 f"decode workspace {format_bytes(self.decode_workspace)}", f"reserve {format_bytes(self.reserve)}"]
        if self.step_copies:
            parts.insert(1, f"fused step's weight copies {format_bytes(self.step_copies)}")
        head = (f"batch {d.get('batch')} x context {d.get('context')} tokens in {d.get('dtype')}: "
                f"needs {format_bytes(self.total)}")
        budget = "no budget given" if self.budget is None else f"budget {format_bytes(self.budget)}"
        return f"{head} ({' + '.join(parts)}); {budget}"

    def check(self) -> "MemoryPlan":
        """Raise DoesNotFit (with the numbers) when the plan exceeds the budget; else return self."""
        if not self.fits:
            fix = ("Reduce batch or context (the prefill chunk is already the smallest tried), or use a smaller "
                   "dtype." if self.detail.get("chunk_auto") else
                   "Reduce batch, context or chunk size, or use a smaller dtype.")
            raise DoesNotFit(f"does not fit: {self.describe()}; over by {format_bytes(self.total - self.budget)}. "
                             + fix)
        return self


def device_budget(device) -> int | None:
    """Free bytes on a CUDA device now (what this process can still allocate), or physical RAM on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def plan_memory(config, dtype=torch.bfloat16, batch: int = 1, context: int = 2048, chunk_size: int | None = None,
                budget: int | None = None, padded: bool = False, weights_resident: bool = True) -> MemoryPlan:
    """Estimate the bytes to prefill `context` tokens per row in chunks and decode up to it.

    chunk_size: prefill tokens per row and chunk; None takes the largest power of two from DEFAULT_CHUNK
    down to MIN_CHUNK whose plan fits `budget` (the plan's detail["chunk_size"] says which; where none fits,
    the plan at MIN_CHUNK, which does not fit). budget: bytes available (None = unknown, the plan always
    'fits'). padded: a left-padded batch makes the chunked prefill materialise a (batch, chunk, context)
    mask. weights_resident: count the weights (False when they are already loaded and the budget is what
    is left).
    """
    if chunk_size is None:
        chunk = DEFAULT_CHUNK
        while True:
            plan = plan_memory(config, dtype, batch, context, chunk, budget, padded, weights_resident)
            if plan.fits or chunk <= MIN_CHUNK:
                plan.detail["chunk_auto"] = True
                return plan
            chunk //= 2
    if batch <= 0 or context <= 0 or chunk_size <= 0:
        raise ValueError(f"batch, context and chunk_size must be positive, got {batch}, {context}, {chunk_size}")
    nb = torch.empty((), dtype=dtype).element_size()
    H, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
    Di, N = config.mamba_inner_size, config.mamba_d_state
    Hq, hd, Hkv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
    has_attn, has_mamba = bool(config.attention_layer_ids), bool(config.mamba_layer_ids)
    has_moe = any(config.is_moe(i) for i in range(config.num_hidden_layers))
    K, X = config.num_experts_per_tok, config.num_experts

    weights = config.param_counts()["total"] * nb if weights_resident else 0
    kv = config.kv_cache_bytes(context, batch, nb)
    mamba = config.mamba_state_bytes(batch, nb)
    key_mask = batch * context + context * 8 if has_attn else 0  # HybridCache.key_mask (bool), positions (int64)

    C = min(chunk_size, context)
    tok = batch * C  # tokens in one prefill chunk
    residual = 4 * tok * H * nb  # h, its norm, the mixer output, the sum
    # Mamba (reference path): in_proj output (2 Di), conv output, z, y in the model dtype; delta, u, B, C, y and
    # the exp(delta*A) / B*u products of one 16-step scan block in fp32; one (Di, N) fp32 state per 16 steps.
    mamba_act = tok * Di * (5 * nb + 6 * 4) + batch * 16 * Di * N * 4 * 2 + (tok // 16 + 1) * Di * N * 4
    # Attention: q, k, v, output of the chunk; in fp32 (no flash kernel) K/V of the whole context expanded
    # to all query heads for the memory-efficient kernel; with padding a boolean mask and its float form.
    attn_act = 4 * tok * Hq * hd * nb + (2 * batch * Hq * context * hd * nb if nb >= 4 and Hq != Hkv else 0)
    if padded:
        attn_act += batch * C * context * (1 + nb)
    ffn_act = tok * K * (H + 3 * F) * nb * 2 + tok * X * 4 if has_moe else tok * 3 * F * nb
    prefill_peak = residual + max(mamba_act if has_mamba else 0, attn_act if has_attn else 0, ffn_act) + batch * V * 4

    # Decode: fp32 scores + masked copy + probabilities over the whole cache for one layer; logits and the
    # sampler's fp32 copies; the dense MoE fallback runs every expert on every row.
    scores = batch * Hq * context * (4 + 4 + nb) if has_attn else 0
    moe_dec = batch * X * 4 * F * nb if has_moe else 0
    decode_ws = scores + batch * V * 4 * 4 + moe_dec + 8 * batch * max(H, Di * N) * 4

    # one row: the fused step's transposed copies of its split layers' last projections
    copies = 0
    if batch <= GEMV_MAX_ROWS:
        per_kind = {"mamba": len(config.mamba_layer_ids) * Di * H,
                    "mlp": sum(not config.is_moe(i) for i in range(config.num_hidden_layers)) * F * H,
                    "moe": sum(config.is_moe(i) for i in range(config.num_hidden_layers)) * X * F * H}
        copies = sum(per_kind[k] for k in SPLIT_DEFAULT) * nb
        if fused.FOLD_DEFAULT and "mamba" in SPLIT_DEFAULT and "moe" not in SPLIT_DEFAULT:  # folded routers' tables
            copies += sum(config.is_moe(i) and not config.is_attention(i)
                          for i in range(config.num_hidden_layers)) * X * (Di + H) * 4
    subtotal = weights + copies + kv + mamba + key_mask + max(prefill_peak, decode_ws)
    reserve = RESERVE_FIXED + int(RESERVE_FRACTION * subtotal)
    detail = dict(batch=batch, context=context, chunk_size=C, dtype=str(dtype).replace("torch.", ""),
                  mamba_act=mamba_act if has_mamba else 0, attn_act=attn_act if has_attn else 0, ffn_act=ffn_act,
                  key_mask=key_mask)
    return MemoryPlan(weights, kv, mamba + key_mask, prefill_peak, decode_ws, reserve, budget, detail, copies)


def max_batch(config, dtype, context: int, budget: int, chunk_size: int | None = None, cap: int = 1024,
              weights_resident: bool = True) -> int:
    """The largest batch (<= cap) whose plan fits `budget` (with its own prefill chunk where chunk_size is
    None); 0 when even batch 1 does not."""
    lo, hi = 0, cap
    while lo < hi:  # bisection: the plan grows monotonically with batch
        mid = (lo + hi + 1) // 2
        if plan_memory(config, dtype, mid, context, chunk_size, budget, weights_resident=weights_resident).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_fits(config, dtype=torch.bfloat16, batch: int = 1, context: int = 2048, chunk_size: int | None = None,
               device="cuda", budget: int | None = None) -> MemoryPlan:
    """Before loading anything: does serving (config, dtype, batch, context) fit on `device`? Counts the
    weights too; the budget defaults to the device's free memory now. Raises DoesNotFit with the numbers,
    else returns the plan."""
    if budget is None:
        budget = device_budget(device)
    return plan_memory(config, dtype, batch, context, chunk_size, budget).check()
