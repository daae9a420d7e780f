"""Causal depthwise conv1d (+ SiLU) as Triton kernels; same contract as the reference twins.

    x: (B, L, D) channel-last    weight: (D, K)    bias: (D,) or None    initial_state: (B, K-1, D)
    causal_conv1d_triton -> (y (B, L, D) in x.dtype, final_state (B, K-1, D))
    causal_conv1d_update_triton: one token x (B, D); conv_state (B, K-1, D) shifted in place -> y (B, D)

Channel-last tiles (BLOCK_T steps x BLOCK_D channels) keep every load coalesced; the K taps are K
shifted loads of the same tile (L1/L2 hits). The backward recomputes the pre-activation, writes
dpre = dy * silu'(pre) once (fp32), and a second kernel forms dx and d(initial_state) from it; weight
and bias gradients are reduced per tile and summed by the caller. The final state is the last K-1
inputs, taken with torch slicing so autograd differentiates it for free.
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
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, y_ptr, dpre_ptr, dy_ptr, dw_ptr, db_ptr,
                     L, D, s_xb, s_xl, s_yb, s_yl,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward (y) or, with BACKWARD, dpre and per-tile weight/bias gradients."""
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
    if not BACKWARD:
        y = acc
        if SILU:
            y = acc * tl.sigmoid(acc)
        tl.store(y_ptr + b * s_yb + offs_t[:, None] * s_yl + offs_d[None, :], y, mask=m2)
    else:
        g = tl.load(dy_ptr + b * s_yb + offs_t[:, None] * s_yl + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        if SILU:
            s = tl.sigmoid(acc)
            g = g * s * (1.0 + acc * (1.0 - s))
        g = tl.where(m2, g, 0.0)
        tl.store(dpre_ptr + b * s_yb + offs_t[:, None] * s_yl + offs_d[None, :], g, mask=m2)
        part = (b * tl.num_programs(0) + pid_t) * D + offs_d
        for k in tl.static_range(K):
            xk = _tap(x_ptr, init_ptr, b, offs_t + (k - (K - 1)), offs_d, mask_d, L, D, K - 1,
                      s_xb, s_xl, HAS_INIT)
            tl.store(dw_ptr + part * K + k, tl.sum(g * xk, axis=0), mask=mask_d)
        if HAS_BIAS:
            tl.store(db_ptr + part, tl.sum(g, axis=0), mask=mask_d)


@triton.jit
def _conv_dx_kernel(dpre_ptr, w_ptr, dxp_ptr, L, D, s_gb, s_gl,
                    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """d(padded input) at rows j of [initial_state ; x]: sum_k w_k * dpre_{j-k}."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_j = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    LP = L + K - 1
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        r = offs_j - k
        m = ((r >= 0) & (r < L))[:, None] & mask_d[None, :]
        g = tl.load(dpre_ptr + b * s_gb + r[:, None] * s_gl + offs_d[None, :], mask=m, other=0.0)
        w = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[None, :] * g
    mo = (offs_j < LP)[:, None] & mask_d[None, :]
    tl.store(dxp_ptr + (b * LP + offs_j[:, None]) * D + offs_d[None, :], acc, mask=mo)


def _blocks(L, D):
    return min(32, max(triton.next_power_of_2(L), 8)), min(64, max(triton.next_power_of_2(D), 8))


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
                               y, y, y, y, y, L, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                               K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=silu,
                               BACKWARD=False, BLOCK_T=BT, BLOCK_D=BD, num_warps=4)
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
        BT, BD = _blocks(L, D)
        nT = triton.cdiv(L, BT)
        dpre = torch.empty(batch, L, D, device=x.device, dtype=torch.float32)
        dw = torch.empty(batch, nT, D, K, device=x.device, dtype=torch.float32)
        db = torch.empty(batch, nT, D, device=x.device, dtype=torch.float32)
        _conv_fwd_kernel[(nT, triton.cdiv(D, BD), batch)](
            x, weight, bias if bias is not None else weight, init if init is not None else x,
            dpre, dpre, dy, dw, db, L, D, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=ctx.silu,
            BACKWARD=True, BLOCK_T=BT, BLOCK_D=BD, num_warps=8)
        LP = L + K - 1
        dxp = torch.empty(batch, LP, D, device=x.device, dtype=torch.float32)
        _conv_dx_kernel[(triton.cdiv(LP, BT), triton.cdiv(D, BD), batch)](
            dpre, weight, dxp, L, D, dpre.stride(0), dpre.stride(1), K=K, BLOCK_T=BT, BLOCK_D=BD, num_warps=4)
        dx = dxp[:, K - 1:].to(x.dtype)
        dinit = dxp[:, :K - 1].to(ctx.init_dtype) if init is not None else None
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
