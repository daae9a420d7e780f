"""Causal depthwise conv1d (+ SiLU) as Triton kernels; same contract as the reference twins.

    x: (B, L, D) channel-last    weight: (D, K)    bias: (D,) or None    initial_state: (B, K-1, D)
    causal_conv1d_triton -> (y (B, L, D) in x.dtype, final_state (B, K-1, D))
    causal_conv1d_update_triton: one token x (B, D); conv_state (B, K-1, D) shifted in place -> y (B, D)

Both kernels walk a chunk of rows forward in time, one channel per lane (coalesced row loads) and the
rows of a block inside each thread: each row is read once, and the K - 1 rows a block reaches back to
are the previous block's tile, reached by in-thread row shifts that compile to register renaming. The
backward computes each pre-activation once, writes dx (in x's dtype) and d(initial_state) directly and
the weight and bias gradients per chunk (summed by the caller).
The final state is the last K-1 inputs, taken with torch slicing so autograd differentiates it for free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selective_scan import _interp_compat  # noqa: F401  (CPU interpreter only)


@triton.jit
def _shifted(cur, prev, offs_t, k: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows of [prev ; cur] k steps back: row t is cur[t - k], or prev[BLOCK_T + t - k] when t < k.
    The time axis lies inside each thread, so the selections fold to register renaming."""
    src = offs_t - k
    a = tl.sum(tl.where(offs_t[None, :, None] == src[:, None, None], cur[None, :, :], -0.0), axis=1)
    if k > 0:
        a += tl.sum(tl.where(offs_t[None, :, None] == (src + BLOCK_T)[:, None, None], prev[None, :, :], -0.0), axis=1)
    return a


@triton.jit
def _load_rows(base, r0, s_l, n_rows, offs_t, offs_d, mask_d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_T - 1 of a (n_rows, D) slab at `base` (row stride s_l) as fp32 (BLOCK_T,
    BLOCK_D), zeros outside [0, n_rows). Loaded one row at a time: one channel per lane and the rows inside
    each thread (the layout the row shifts need; a 2-D load would be vectorised across channels)."""
    v = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(BLOCK_T):
        r = r0 + i + 0 * offs_d  # as a vector: a scalar-valued mask is not accepted everywhere
        row = tl.load(base + r * s_l + offs_d, mask=mask_d & (r >= 0) & (r < n_rows), other=0.0)
        v = tl.where(offs_t[:, None] == i, row.to(tl.float32)[None, :], v)
    return v


@triton.jit
def _store_rows(base, r0, s_l, n_rows, tile, offs_t, offs_d, mask_d, BLOCK_T: tl.constexpr):
    """Rows of `tile` to rows r0 .. r0 + BLOCK_T - 1 of a (n_rows, D) slab, those inside [0, n_rows) only,
    one row at a time (for the same reason as _load_rows)."""
    for i in tl.static_range(BLOCK_T):
        r = r0 + i + 0 * offs_d
        row = tl.sum(tl.where(offs_t[:, None] == i, tile, -0.0), axis=0)
        tl.store(base + r * s_l + offs_d, row, mask=mask_d & (r >= 0) & (r < n_rows))


@triton.jit
def _tap_rows(x_ptr, init_ptr, b, r0, offs_t, offs_d, mask_d, L, D, K1, s_xb, s_xl, HAS_INIT: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Inputs at x-rows r0 .. r0 + BLOCK_T - 1, rows -(K-1)..-1 from the initial state (its rows 0..K-2),
    zeros outside."""
    v = _load_rows(x_ptr + b * s_xb, r0, s_xl, L, offs_t, offs_d, mask_d, BLOCK_T, BLOCK_D)
    if HAS_INIT:
        v += _load_rows(init_ptr + b * K1 * D, r0 + K1, D, K1, offs_t, offs_d, mask_d, BLOCK_T, BLOCK_D)
    return v


@triton.jit
def _pre_act(x_cur, x_prev, w_ptr, bias, offs_t, offs_d, mask_d, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """bias + sum_j w_j x_{t - (K-1) + j} for the block's rows (x_prev: the block before)."""
    acc = tl.zeros_like(x_cur) + bias[None, :]
    for j in tl.static_range(K):
        w = tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[None, :] * _shifted(x_cur, x_prev, offs_t, K - 1 - j, BLOCK_T)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, y_ptr, L, D, n_blk, s_xb, s_xl, s_yb, s_yl,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """A chunk of n_blk blocks of BLOCK_T rows, each input row loaded once, the K - 1 rows before a block
    taken from the previous block's tile by in-thread row shifts."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    r0 = pid_c * n_blk * BLOCK_T
    x_prev = _tap_rows(x_ptr, init_ptr, b, r0 - BLOCK_T, offs_t, offs_d, mask_d, L, D, K - 1, s_xb, s_xl,
                       HAS_INIT, BLOCK_T, BLOCK_D)
    for i in range(0, n_blk):
        rb = r0 + i * BLOCK_T
        x_cur = _tap_rows(x_ptr, init_ptr, b, rb, offs_t, offs_d, mask_d, L, D, K - 1, s_xb, s_xl, HAS_INIT,
                          BLOCK_T, BLOCK_D)
        acc = _pre_act(x_cur, x_prev, w_ptr, bias, offs_t, offs_d, mask_d, K, BLOCK_T)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        for t in tl.static_range(BLOCK_T):
            r = rb + t + 0 * offs_d
            yr = tl.sum(tl.where(offs_t[:, None] == t, acc, -0.0), axis=0)
            tl.store(y_ptr + b * s_yb + r * s_yl + offs_d, yr, mask=mask_d & (r < L))
        x_prev = x_cur


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, dy_ptr, dx_ptr, dinit_ptr, dw_ptr, db_ptr,
                     L, D, n_blk, s_xb, s_xl, s_gb, s_gl, s_ob, s_ol,
                     K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Walks a chunk of n_blk blocks of BLOCK_T rows forward in time. Block rows r carry
    dpre_r = dy_r silu'(pre_r); the x-row s = r - (K-1) gets d(input)_s = sum_m w_{K-1-m} dpre_{s+m}.
    The K-1 rows before each block (its x inputs and dpre) are the previous block's, kept in registers
    and reached by in-thread row shifts, so every input is loaded once and pre is computed once per row.
    A warm-up block before the chunk supplies them for the first block. Rows run to L + K - 2 so that
    the last inputs (and the initial state, x-rows -(K-1)..-1) receive their whole gradient."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, KP)
    mask_d = offs_d < D
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    r0 = pid_c * n_blk * BLOCK_T
    x_prev = _tap_rows(x_ptr, init_ptr, b, r0 - 2 * BLOCK_T, offs_t, offs_d, mask_d, L, D, K - 1, s_xb, s_xl,
                       HAS_INIT, BLOCK_T, BLOCK_D)
    g_prev = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dw_acc = tl.zeros([KP, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(-1, n_blk):
        rb = r0 + i * BLOCK_T
        rows = rb + offs_t
        x_cur = _tap_rows(x_ptr, init_ptr, b, rb, offs_t, offs_d, mask_d, L, D, K - 1, s_xb, s_xl, HAS_INIT,
                          BLOCK_T, BLOCK_D)
        pre = _pre_act(x_cur, x_prev, w_ptr, bias, offs_t, offs_d, mask_d, K, BLOCK_T)
        valid = ((rows >= 0) & (rows < L))[:, None] & mask_d[None, :]
        g = _load_rows(dy_ptr + b * s_gb, rb, s_gl, L, offs_t, offs_d, mask_d, BLOCK_T, BLOCK_D)
        if SILU:
            sg = tl.sigmoid(pre)
            g = g * sg * (1.0 + pre * (1.0 - sg))
        g = tl.where(valid, g, 0.0)
        if i >= 0:
            dxa = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for m in tl.static_range(K):
                w = tl.load(w_ptr + offs_d * K + (K - 1 - m), mask=mask_d, other=0.0).to(tl.float32)
                dxa += w[None, :] * _shifted(g, g_prev, offs_t, K - 1 - m, BLOCK_T)
            s0 = rb - (K - 1)  # x-row of the block's first row; x-rows -(K-1)..-1 are the initial state's
            _store_rows(dx_ptr + b * s_ob, s0, s_ol, L, dxa, offs_t, offs_d, mask_d, BLOCK_T)
            if HAS_INIT:
                _store_rows(dinit_ptr + b * (K - 1) * D, s0 + K - 1, D, K - 1, dxa, offs_t, offs_d, mask_d, BLOCK_T)
            for j in tl.static_range(K):
                part = tl.sum(g * _shifted(x_cur, x_prev, offs_t, K - 1 - j, BLOCK_T), axis=0)
                dw_acc += tl.where(offs_k[:, None] == j, part[None, :], 0.0)
            db_acc += tl.sum(g, axis=0)
        x_prev, g_prev = x_cur, g
    part_offs = (b * tl.num_programs(0) + pid_c) * D + offs_d
    tl.store(dw_ptr + part_offs[None, :] * K + offs_k[:, None], dw_acc, mask=(offs_k < K)[:, None] & mask_d[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + part_offs, db_acc, mask=mask_d)


# (BLOCK_T, BLOCK_D, blocks per chunk) of both kernels instead of the default
TILES_OVERRIDE: tuple[int, int, int] | None = None


def _tiles(L, D, K) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, blocks per chunk): one channel per thread (BLOCK_D / 32 warps), 8 rows per
    block, 128-row chunks; the backward's fastest in a sweep on the H200 (benchmarks/KERNEL_NOTES.md).
    A block must cover the K - 1 rows reached back."""
    default = (max(8, triton.next_power_of_2(K - 1)), min(128, max(32, triton.next_power_of_2(D))), 16)
    bt, bd, nb = TILES_OVERRIDE or default
    if bt < K - 1:
        raise ValueError(f"conv BLOCK_T {bt} < K - 1 = {K - 1}")
    return bt, bd, nb


class _CausalConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu):
        batch, L, D = x.shape
        K = weight.shape[1]
        weight = weight.contiguous()
        # the reference rounds the initial state to x's dtype before the conv
        init = initial_state.to(x.dtype).contiguous() if initial_state is not None else None
        y = torch.empty(batch, L, D, device=x.device, dtype=x.dtype)
        common = (x, weight, bias if bias is not None else weight, init if init is not None else x, y, L, D)
        flags = dict(K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=silu)
        BT, BD, nb = _tiles(L, D, K)
        nb = max(1, min(nb, triton.cdiv(L, BT)))
        _conv_fwd_kernel[(triton.cdiv(L, BT * nb), triton.cdiv(D, BD), batch)](
            *common, nb, x.stride(0), x.stride(1), y.stride(0), y.stride(1), **flags, BLOCK_T=BT, BLOCK_D=BD,
            num_warps=max(1, BD // 32))
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
        LP = L + K - 1  # rows of [initial_state ; x]
        dx = torch.empty(batch, L, D, device=x.device, dtype=x.dtype)
        dinit = torch.empty(batch, K - 1, D, device=x.device, dtype=torch.float32) if init is not None else None
        common = (x, weight, bias if bias is not None else weight, init if init is not None else x, dy, dx)
        flags = dict(K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=ctx.silu)
        BT, BD, nb = _tiles(L, D, K)
        nb = max(1, min(nb, triton.cdiv(LP, BT)))
        nT = triton.cdiv(LP, BT * nb)
        dw = torch.empty(batch, nT, D, K, device=x.device, dtype=torch.float32)
        db = torch.empty(batch, nT, D, device=x.device, dtype=torch.float32)
        _conv_bwd_kernel[(nT, triton.cdiv(D, BD), batch)](
            *common, dinit if dinit is not None else dw, dw, db, L, D, nb, x.stride(0), x.stride(1),
            dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), KP=triton.next_power_of_2(K), **flags,
            BLOCK_T=BT, BLOCK_D=BD, num_warps=max(1, BD // 32))
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
