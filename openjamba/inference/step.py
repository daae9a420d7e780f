"""The one-token decoding step on the static cache path: fixed shapes, no host reads, graph-capturable.

`decode_step(model, token_ids, cache, moe_impl)` runs the same layers as `JambaForCausalLM.forward` for
one token per row, but
- attention layers use `Attention.forward_static` (position from the device tensor `cache.pos`);
- Mamba layers use their one-token path, which updates conv and SSM state in place (already static);
- MoE layers use `moe_forward_static`, a routing that never asks the host how many tokens each expert got
  (the reference MoE op does, with `.tolist()`, which a CUDA graph cannot contain);
- `cache.pos` is incremented on the device at the end. The caller advances `cache.length` (host) by one.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("openjamba.inference")

MOE_IMPLS = ("auto", "ops", "grouped_mm", "dense")


def moe_forward_static(moe, x: torch.Tensor, impl: str) -> torch.Tensor:
    """The MoE FFN (softmax router, top-k without renormalisation) with sync-free expert dispatch.

    x: (B, T, H). impl:
      "ops": the model's own MoE layer, i.e. the ops backend's moe_experts; chosen only where that resolves
          to the grouped-GEMM kernel (ops/moe/grouped.py), which is sync-free by contract;
      "grouped_mm": sort the T*K assignments by expert and run both expert matmuls with
          torch._grouped_mm, whose group boundaries are a device tensor: only the routed experts' weights
          are read (the bandwidth-optimal choice at small batch);
      "dense": every expert on every token, weighted by a (T, X) matrix that is zero off the top-k: reads
          all experts' weights, no indexing at all (the portable fallback).
    """
    if impl == "ops":
        return moe(x)[0]
    B, T, H = x.shape
    x_TH = x.reshape(-1, H)
    probs = torch.softmax(moe.router(x_TH).float(), dim=-1)  # (BT, X)
    top_w, top_idx = torch.topk(probs, moe.top_k, dim=-1)  # (BT, K), not renormalised (Jamba)
    top_w = top_w.to(x.dtype)
    w_gate_up_XFH, w_down_XHF = moe.experts.gate_up_proj, moe.experts.down_proj
    X, K = w_gate_up_XFH.shape[0], moe.top_k
    if impl == "dense":
        w_TX = torch.zeros(x_TH.shape[0], X, device=x.device, dtype=x.dtype).scatter_(1, top_idx, top_w)
        gate_up_XTF = torch.matmul(x_TH, w_gate_up_XFH.transpose(1, 2))  # (X, BT, 2F)
        gate, up = gate_up_XTF.chunk(2, dim=-1)
        y_XTH = torch.bmm(F.silu(gate) * up, w_down_XHF.transpose(1, 2))  # (X, BT, H)
        out = (y_XTH * w_TX.t()[:, :, None]).sum(0)
    elif impl == "grouped_mm":
        flat = top_idx.reshape(-1)  # (BT*K,) expert of each assignment
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(X, device=x.device, dtype=torch.long).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)  # end row of each expert's group, on the device
        x_sorted = x_TH[order // K]  # (BT*K, H) grouped by expert
        gate, up = torch._grouped_mm(x_sorted, w_gate_up_XFH.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y_sorted = torch._grouped_mm(F.silu(gate) * up, w_down_XHF.transpose(1, 2), offs=offs)  # (BT*K, H)
        y_sorted = y_sorted * top_w.reshape(-1)[order, None]
        # Undo the sort and sum over k: deterministic, unlike an atomic index_add.
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
        out = y.view(-1, K, H).sum(1)
    else:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {MOE_IMPLS[1:]}")
    return out.view(B, T, H)


def grouped_mm_works(device, dtype) -> str | None:
    """None when torch._grouped_mm runs and is right for this device and dtype, else the reason not.

    Checked on a small problem with uneven and empty groups rather than assumed: its CUDA kernel needs a
    recent GPU and dtype, and its CPU fallback exists only in recent torch."""
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm is not in this torch"
    if torch.device(device).type == "cuda" and dtype != torch.bfloat16:
        # other dtypes take a fallback that copies the group offsets to the host: no CUDA-graph capture
        return f"torch._grouped_mm on CUDA runs {dtype} through a host-synchronising fallback"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(5, 32, generator=g).to(device=device, dtype=dtype)
        w = torch.randn(3, 48, 32, generator=g).to(device=device, dtype=dtype)  # (X, F, H)
        offs = torch.tensor([2, 2, 5], device=device, dtype=torch.int32)  # expert 1 gets no rows
        got = torch._grouped_mm(x, w.transpose(1, 2), offs=offs).float()
        want = torch.cat([x[:2] @ w[0].t(), x[2:] @ w[2].t()]).float()
    except Exception as e:  # noqa: BLE001 - any failure means "do not use it here"
        return f"torch._grouped_mm failed here: {type(e).__name__}: {e}"
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
        return "torch._grouped_mm gave wrong results here"
    return None


def resolve_moe_impl(impl: str, device, dtype) -> str:
    """'auto' -> the ops backend's grouped kernel where it is active (CUDA), else torch._grouped_mm where it
    works (checked), else dense. An explicit choice that cannot run is an error."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {MOE_IMPLS}")
    if impl in ("auto", "ops"):
        from .. import ops

        on_cuda = torch.device(device).type == "cuda"
        try:
            _, backend = ops.resolve("moe_experts", on_cuda)
        except ops.BackendUnavailable:
            backend = "reference"
        # The grouped kernel runs bf16 on CUDA; other dtypes there take one of the routings below.
        if backend != "reference" and (not on_cuda or dtype == torch.bfloat16):
            impl = "ops"
        elif impl == "ops":
            raise RuntimeError("MoE implementation 'ops' was requested but the ops backend resolves moe_experts "
                               "to the reference, which reads expert counts back to the host")
    if impl in ("auto", "grouped_mm"):
        reason = grouped_mm_works(device, dtype)
        if reason is None:
            impl = "grouped_mm"
        elif impl == "grouped_mm":
            raise RuntimeError(f"MoE implementation 'grouped_mm' was requested but cannot run: {reason}")
        else:
            logger.info("MoE decode: grouped_mm unavailable (%s); using dense", reason)
            impl = "dense"
    logger.info("MoE decode on %s/%s: %s", torch.device(device).type, dtype, impl)
    return impl


def decode_step(model, token_ids: torch.Tensor, cache, moe_impl: str) -> torch.Tensor:
    """token_ids (B, 1) long -> last-position logits (B, V) in the model dtype; advances `cache.pos`."""
    h = model.model.embed_tokens(token_ids)  # (B, 1, H)
    for layer in model.model.layers:
        r = layer.input_layernorm(h)
        r = layer.self_attn.forward_static(r, cache) if layer.is_attention else layer.mamba(r, None, cache)
        h = h + r
        r = layer.pre_ff_layernorm(h)
        r = moe_forward_static(layer.feed_forward, r, moe_impl) if layer.is_moe else layer.feed_forward(r)
        h = h + r
    logits = model.lm_head(model.model.final_layernorm(h))[:, -1]
    cache.pos.add_(1)
    return logits
