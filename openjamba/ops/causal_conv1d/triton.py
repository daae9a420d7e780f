"""Causal depthwise conv1d (+ SiLU) as Triton kernels; same contract as the reference twins.

    x: (B, L, D) channel-last    weight: (D, K)    bias: (D,) or None    initial_state: (B, K-1, D)
    causal_conv1d_triton -> (y (B, L, D) in x.dtype, final_state (B, K-1, D))
    causal_conv1d_update_triton: one token x (B, D); conv_state (B, K-1, D) shifted in place -> y (B, D)

Channel-last tiles (BLOCK_T steps x BLOCK_D channels) keep every load coalesced; the K taps are K
shifted loads of the same tile (L1/L2 hits). The backward is one kernel: each tile recomputes the
pre-activations of the K rows that reach it (shifted loads again), forms dx (in x's dtype) and
d(initial_state) directly, and reduces the weight and bias gradients per tile (summed by the caller).
The final state is the last K-1 inputs, taken with torch slicing so autograd differentiates it for free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selective_scan import _interp_compat  # noqa: F401  (CPU interpreter only)


@triton.jit
def _tap(x_ptr, init_ptr, b, r, offs_d, mask_d, L, D, K1, s_xb, s_xl, HAS_INIT: tl.constexpr):
    """Inputs at x-rows r (negative rows come from the initial state), fp32 (BT, BD)."""
    m = ((r >= 0) & (r < L))[:, None] & mask_d[None, :]
    v = tl.load(x_ptr + b * s_xb + r[:, None] * s_xl + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_INIT:
        ri = r + K1
        mi = ((r < 0) & (ri >= 0))[:, None] & mask_d[None, :]
        v += tl.load(init_ptr + (b * K1 + ri[:, None]) * D + offs_d[None, :], mask=mi, other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, y_ptr, L, D, s_xb, s_xl, s_yb, s_yl,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m2 = (offs_t < L)[:, None] & mask_d[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[None, :] * _tap(x_ptr, init_ptr, b, offs_t + (k - (K - 1)), offs_d, mask_d, L, D, K - 1,
                                 s_xb, s_xl, HAS_INIT)
    y = acc
    if SILU:
        y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * s_yb + offs_t[:, None] * s_yl + offs_d[None, :], y, mask=m2)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, dy_ptr, dx_ptr, dinit_ptr, dw_ptr, db_ptr,
                     L, D, s_xb, s_xl, s_gb, s_gl, s_ob, s_ol,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass: d(padded input) rows j of [initial_state ; x] (x-row s = j - (K-1)) and per-tile
    weight/bias gradients. d(input)_s = sum_m w_{K-1-m} dpre_{s+m}; the K dpre rows it needs are
    recomputed from shifted loads of x and dy (L1/L2 hits) instead of going through memory."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s_rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T) - (K - 1)  # x-rows, the first K-1 in the initial state
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dxa = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dpre0 = dxa
    for m in tl.static_range(K):
        r = s_rows + m  # rows whose dpre reaches s through tap K-1-m
        pre = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + bias[None, :]
        for j in tl.static_range(K):
            w = tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32)
            # the same row offset m + j - (K - 1) for every (m, j) pair with equal sum: the compiler
            # merges those loads (2K - 1 distinct x tiles, not K * K)
            pre += w[None, :] * _tap(x_ptr, init_ptr, b, s_rows + (m + j - (K - 1)), offs_d, mask_d, L, D, K - 1,
                                     s_xb, s_xl, HAS_INIT)
        mr = ((r >= 0) & (r < L))[:, None] & mask_d[None, :]
        g = tl.load(dy_ptr + b * s_gb + r[:, None] * s_gl + offs_d[None, :], mask=mr, other=0.0).to(tl.float32)
        if SILU:
            sg = tl.sigmoid(pre)
            g = g * sg * (1.0 + pre * (1.0 - sg))
        g = tl.where(mr, g, 0.0)
        w = tl.load(w_ptr + offs_d * K + (K - 1 - m), mask=mask_d, other=0.0).to(tl.float32)
        dxa += w[None, :] * g
        if m == 0:
            dpre0 = g
    mx = ((s_rows >= 0) & (s_rows < L))[:, None] & mask_d[None, :]
    tl.store(dx_ptr + b * s_ob + s_rows[:, None] * s_ol + offs_d[None, :], dxa, mask=mx)
    if HAS_INIT:
        mi = (s_rows < 0)[:, None] & mask_d[None, :]
        tl.store(dinit_ptr + (b * (K - 1) + (s_rows + K - 1)[:, None]) * D + offs_d[None, :], dxa, mask=mi)
    # weight and bias gradients over this tile's x-rows (dpre0 is zero outside [0, L))
    part = (b * tl.num_programs(0) + pid_t) * D + offs_d
    for k in tl.static_range(K):
        xk = _tap(x_ptr, init_ptr, b, s_rows + (k - (K - 1)), offs_d, mask_d, L, D, K - 1, s_xb, s_xl, HAS_INIT)
        tl.store(dw_ptr + part * K + k, tl.sum(dpre0 * xk, axis=0), mask=mask_d)
    if HAS_BIAS:
        tl.store(db_ptr + part, tl.sum(dpre0, axis=0), mask=mask_d)


def _blocks(L, D):
    return min(32, max(triton.next_power_of_2(L), 8)), min(64, max(triton.next_power_of_2(D), 8))


def _bwd_config(L, D) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the backward kernel."""
    return (*_blocks(L, D), 4)


class _CausalConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu):
        batch, L, D = x.shape
        K = weight.shape[1]
        weight = weight.contiguous()
        # the reference rounds the initial state to x's dtype before the conv
        init = initial_state.to(x.dtype).contiguous() if initial_state is not None else None
        y = torch.empty(batch, L, D, device=x.device, dtype=x.dtype)
        BT, BD = _blocks(L, D)
        grid = (triton.cdiv(L, BT), triton.cdiv(D, BD), batch)
        _conv_fwd_kernel[grid](x, weight, bias if bias is not None else weight, init if init is not None else x,
                               y, L, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                               K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=silu,
                               BLOCK_T=BT, BLOCK_D=BD, num_warps=4)
        ctx.save_for_backward(x, weight, bias, init)
        ctx.silu = silu
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, init = ctx.saved_tensors
        batch, L, D = x.shape
        K = weight.shape[1]
        dy = dy.contiguous()
        BT, BD, warps = _bwd_config(L, D)
        LP = L + K - 1  # rows of [initial_state ; x]
        nT = triton.cdiv(LP, BT)
        dx = torch.empty(batch, L, D, device=x.device, dtype=x.dtype)
        dinit = torch.empty(batch, K - 1, D, device=x.device, dtype=torch.float32) if init is not None else None
        dw = torch.empty(batch, nT, D, K, device=x.device, dtype=torch.float32)
        db = torch.empty(batch, nT, D, device=x.device, dtype=torch.float32)
        _conv_bwd_kernel[(nT, triton.cdiv(D, BD), batch)](
            x, weight, bias if bias is not None else weight, init if init is not None else x, dy, dx,
            dinit if dinit is not None else dw, dw, db, L, D, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dx.stride(0), dx.stride(1), K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=ctx.silu,
            BLOCK_T=BT, BLOCK_D=BD, num_warps=warps)
        dinit = dinit.to(ctx.init_dtype) if dinit is not None else None
        dbias = db.sum((0, 1)).to(bias.dtype) if bias is not None else None
        return dx, dw.sum((0, 1)).to(weight.dtype), dbias, dinit, None


def causal_conv1d_triton(x, weight, bias=None, activation: str | None = "silu", initial_state=None):
    """Returns (y, final_state) exactly like `causal_conv1d_ref`; differentiable in every input."""
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, L, D = x.shape
    K = weight.shape[1]
    if L == 0:
        y = x.new_zeros(batch, 0, D)
    else:
        y = _CausalConvFn.apply(x, weight, bias, initial_state, activation == "silu")
    # final state = last K-1 rows of [initial_state ; x]
    if L >= K - 1:
        final = x[:, L - (K - 1):].clone()
    else:
        init = initial_state.to(x.dtype) if initial_state is not None else x.new_zeros(batch, K - 1, D)
        final = torch.cat([init[:, L:], x], dim=1)
    return y, final


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, D, s_xb, s_sb, s_sk, s_yb,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x = tl.load(x_ptr + b * s_xb + offs_d, mask=mask_d, other=0.0)
    acc = tl.load(w_ptr + offs_d * K + (K - 1), mask=mask_d, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    prev = x
    # walk the window newest to oldest, shifting each stored input one slot towards the past
    for i in tl.static_range(K - 1):
        k = K - 2 - i
        s_ptrs = state_ptr + b * s_sb + k * s_sk + offs_d
        old = tl.load(s_ptrs, mask=mask_d, other=0.0)
        acc += tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32) * old.to(tl.float32)
        tl.store(s_ptrs, prev.to(old.dtype), mask=mask_d)
        prev = old
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * s_yb + offs_d, acc, mask=mask_d)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation: str | None = "silu"):
    """One token (x: (B, D)) through the conv; conv_state (B, K-1, D) is shifted in place. Returns y (B, D)."""
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}")
    if conv_state.stride(-1) != 1:
        raise ValueError("conv_state must have a contiguous last dim (it is updated in place)")
    batch, D = x.shape
    K = weight.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    y = torch.empty(batch, D, device=x.device, dtype=x.dtype)
    BD = min(1024, max(triton.next_power_of_2(D), 8))
    _conv_update_kernel[(triton.cdiv(D, BD), batch)](
        x, conv_state, weight, bias if bias is not None else weight, y, D,
        x.stride(0), conv_state.stride(0), conv_state.stride(1) if K > 1 else 0, y.stride(0),
        K=K, HAS_BIAS=bias is not None, SILU=activation == "silu", BLOCK_D=BD, num_warps=4)
    return y
