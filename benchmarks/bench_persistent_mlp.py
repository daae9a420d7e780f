"""Can one persistent kernel stream a stack of layers faster than a chain of PDL-launched kernels? A test of the
design the batch-1 decode step would need, on the simplest piece: jamba-1b's dense MLP layers.

    python benchmarks/bench_persistent_mlp.py            # jamba-1b widths, bf16, batch 1

The persistent kernel runs --calls MLP layers (the model's dense layers in turn: h += down(silu(gate) * up)
of RMSNorm(h)) with one program per SM and two grid-wide barriers per layer (after gate/up, after the
residual add). Each program streams its share of a stage's weights ahead of the barrier it waits at, in one
of three forms: held in registers (Triton; bf16 pairs as int32 words, so they stay packed), loaded DEPTH
stages ahead between the program's arrival at a barrier and its wait there (DEPTH 1: the next stage's
weights stream during the wait, what PDL gives a kernel chain; DEPTH 2: the stage after that as well); or
staged in shared memory by cp.async or by TMA bulk copies (Gluon), each buffer refilled for the next layer
as soon as its stage has read it. Variants without the barriers (the streams and the arithmetic alone;
results not checked) and on one layer repeated (its weights stay in L2) split the time. Side by side, in one
run: the fused decode step's own MLP kernels (ffn_up + down_residual, PDL) for the same layers, each through
a CUDA graph, microseconds per layer, against the weight bytes at 4.27 TB/s. Every variant with barriers is
checked against the eager layers (exit code 1 where one strays). Writes
benchmarks/results/persistent_mlp_<gpu>.json (or --out). Needs CUDA; the shared-memory forms need Triton's
Gluon dialect and a GPU with TMA (compute capability 9).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

BANDWIDTH = 4.27e12  # bytes/s: the H200's device-copy ceiling (shared/anchors.md)


@triton.jit
def _arrive(bar_ptr):
    """Every thread's stores of this program are done (CTA barrier), then one release add on the counter."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(bar_ptr, target):
    """Spin until the grid barrier's counter reaches target (acquire: the arrivals' stores are visible). Also
    called from the Gluon kernels below."""
    c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while c < target:
        c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _tile(w_ptr, K, r0, rend, BR: tl.constexpr, k0, BK: tl.constexpr):
    """W[r0:r0+BR, k0:k0+BK] of a row-major (., K) weight of int32 words (two bf16 each); rows >= rend and
    columns >= K are 0."""
    rs = r0 + tl.arange(0, BR)
    ks = k0 + tl.arange(0, BK)
    return tl.load(w_ptr + rs[:, None] * K + ks[None, :], mask=(rs[:, None] < rend) & (ks[None, :] < K), other=0,
                   eviction_policy="evict_first")


@triton.jit
def _up_tiles(wgu_ptr, layer, pid, F2, HW, RU: tl.constexpr, BU1: tl.constexpr, BU2: tl.constexpr,
              BHW: tl.constexpr):
    w = wgu_ptr + (layer + 0 * pid).to(tl.int64) * F2 * HW
    r0 = pid * RU
    rend = tl.minimum(r0 + RU, F2)
    return _tile(w, HW, r0, rend, BU1, 0, BHW), _tile(w, HW, r0 + BU1, rend, BU2, 0, BHW)


@triton.jit
def _down_tiles(wd_ptr, layer, pid, H, FW, RD: tl.constexpr, BD: tl.constexpr, KD1: tl.constexpr,
                KD2: tl.constexpr):
    w = wd_ptr + (layer + 0 * pid).to(tl.int64) * H * FW
    r0 = pid * RD
    rend = tl.minimum(r0 + RD, H)
    return _tile(w, FW, r0, rend, BD, 0, KD1), _tile(w, FW, r0, rend, BD, KD1, KD2)


@triton.jit
def _gemv(w, xe, xo):
    """Rows of a packed bf16 tile (int32 words: element 2j in the low half) against x's even and odd columns.
    bf16 -> fp32 is a 16-bit shift, so the tile stays two values per register until here."""
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    return tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)


@triton.jit
def _silu_mul(gu_ptr, F, k0, BK: tl.constexpr, ODD: tl.constexpr):
    """silu(gate) * up for columns 2k + ODD, k in [k0, k0+BK), of the (2F,) gate/up row, rounded to the dtype as
    the eager MLP rounds."""
    ks = 2 * (k0 + tl.arange(0, BK)) + ODD
    dt = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(tl.float32)
    u = tl.load(gu_ptr + F + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(tl.float32)
    return ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)


@triton.jit
def _norm_half(h_ptr, nw_ptr, H, BHW: tl.constexpr, ODD: tl.constexpr):
    hs = 2 * tl.arange(0, BHW) + ODD
    x = tl.load(h_ptr + hs, mask=hs < H, other=0.0, cache_modifier=".cg").to(tl.float32)
    w = tl.load(nw_ptr + hs, mask=hs < H, other=0.0).to(tl.float32)
    return x, (x * w).to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def mlp_stack_kernel(h_ptr, gu_ptr, wgu_ptr, nw_ptr, wd_ptr, bar_ptr, CALLS, NL, eps, H, F, P,
                     RU: tl.constexpr, BU1: tl.constexpr, BU2: tl.constexpr, RD: tl.constexpr, BD: tl.constexpr,
                     KD1: tl.constexpr, KD2: tl.constexpr, BHW: tl.constexpr, DEPTH: tl.constexpr,
                     SYNC: tl.constexpr):
    """CALLS dense MLP layers, layer i % NL on call i, on a (H,) bf16 residual row h updated in place. P
    programs, all resident (the barriers need it). Up stage: this program's RU rows of the stacked (2F, H)
    gate/up weight of RMSNorm(h) -> gu (2F,). Down stage: its RD rows of the (H, F) down weight of
    silu(gate) * up -> h[rows] += . Weights (bf16 pairs as int32 words) held in registers, loaded DEPTH
    stages ahead (1 or 2). SYNC False drops the barriers (wrong results: the weight streams alone, timed)."""
    pid = tl.program_id(0)
    dt = h_ptr.dtype.element_ty
    F2 = 2 * F
    HW = H // 2
    FW = F // 2
    d0 = pid * RD
    drows = d0 + tl.arange(0, BD)
    dmask = (drows < d0 + RD) & (drows < H)
    u1, u2 = _up_tiles(wgu_ptr, 0, pid, F2, HW, RU, BU1, BU2, BHW)
    if DEPTH == 2:
        w1, w2 = _down_tiles(wd_ptr, 0, pid, H, FW, RD, BD, KD1, KD2)
    stage = 0
    for i in range(CALLS):
        layer = i % NL
        nxt = (i + 1) % NL
        # up: h is final (the previous layer's residual adds all arrived)
        if SYNC:
            _wait(bar_ptr, stage * P)
        xe, ne = _norm_half(h_ptr, nw_ptr + layer * H, H, BHW, 0)
        xo, no = _norm_half(h_ptr, nw_ptr + layer * H, H, BHW, 1)
        rstd = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / H + eps)
        r0 = pid * RU
        rend = tl.minimum(r0 + RU, F2)
        ra = r0 + tl.arange(0, BU1)
        tl.store(gu_ptr + ra, (_gemv(u1, ne, no) * rstd).to(dt), mask=ra < rend)
        rb = r0 + BU1 + tl.arange(0, BU2)
        tl.store(gu_ptr + rb, (_gemv(u2, ne, no) * rstd).to(dt), mask=rb < rend)
        if SYNC:
            _arrive(bar_ptr)
        # weights loaded after the release and before the wait: issued before the release add, they measured
        # slower (the release orders every earlier access, loads included, so they did not overlap the wait)
        if DEPTH == 2:
            u1, u2 = _up_tiles(wgu_ptr, nxt, pid, F2, HW, RU, BU1, BU2, BHW)
        else:
            w1, w2 = _down_tiles(wd_ptr, layer, pid, H, FW, RD, BD, KD1, KD2)
        stage += 1
        # down: every program's gate/up rows arrived
        if SYNC:
            _wait(bar_ptr, stage * P)
        y = _gemv(w1, _silu_mul(gu_ptr, F, 0, KD1, 0), _silu_mul(gu_ptr, F, 0, KD1, 1))
        y += _gemv(w2, _silu_mul(gu_ptr, F, KD1, KD2, 0), _silu_mul(gu_ptr, F, KD1, KD2, 1))
        hr = tl.load(h_ptr + drows, mask=dmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(h_ptr + drows, (hr + y.to(dt).to(tl.float32)).to(dt), mask=dmask)
        if SYNC:
            _arrive(bar_ptr)
        if DEPTH == 2:
            w1, w2 = _down_tiles(wd_ptr, nxt, pid, H, FW, RD, BD, KD1, KD2)
        else:
            u1, u2 = _up_tiles(wgu_ptr, nxt, pid, F2, HW, RU, BU1, BU2, BHW)
        stage += 1


# ---- the same stack with the weights staged in shared memory by asynchronous copies (Gluon) ----
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # Triton without the Gluon dialect: the shared-memory forms are not offered
    gluon = None
else:  # names that changed between Triton 3.6 and 3.9
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

if gluon is not None:
    @gluon.jit
    def _g_copy(smem, w_ptr, K, r0, rend, BR: gl.constexpr, k0, BK: gl.constexpr, CL: gl.constexpr):
        """cp.async W[r0:r0+BR, k0:k0+BK] (bf16, row stride K) into smem; rows >= rend, columns >= K skipped."""
        rs = r0 + gl.arange(0, BR, layout=gl.SliceLayout(1, CL))
        ks = k0 + gl.arange(0, BK, layout=gl.SliceLayout(0, CL))
        _cp_async(smem, w_ptr + rs[:, None] * K + ks[None, :],
                                               mask=(rs[:, None] < rend) & (ks[None, :] < K))

    @gluon.jit
    def _g_up_copy(u1, u2, wgu_ptr, layer, pid, F2, H, RU: gl.constexpr, BU1: gl.constexpr, BU2: gl.constexpr,
                   BH: gl.constexpr, CL: gl.constexpr):
        w = wgu_ptr + (layer + 0 * pid).to(gl.int64) * F2 * H
        r0 = pid * RU
        rend = gl.minimum(r0 + RU, F2)
        _g_copy(u1, w, H, r0, rend, BU1, 0, BH, CL)
        _g_copy(u2, w, H, r0 + BU1, rend, BU2, 0, BH, CL)
        async_copy.commit_group()

    @gluon.jit
    def _g_down_copy(d1, d2, wd_ptr, layer, pid, H, F, RD: gl.constexpr, BD: gl.constexpr, KD1: gl.constexpr,
                     KD2: gl.constexpr, CL: gl.constexpr):
        w = wd_ptr + (layer + 0 * pid).to(gl.int64) * H * F
        r0 = pid * RD
        rend = gl.minimum(r0 + RD, H)
        _g_copy(d1, w, F, r0, rend, BD, 0, KD1, CL)
        _g_copy(d2, w, F, r0, rend, BD, KD1, KD2, CL)
        async_copy.commit_group()

    @gluon.jit
    def _g_rows(smem, x, RC: gl.constexpr, c: gl.constexpr, WL: gl.constexpr):
        """Rows [c RC, (c+1) RC) of a staged tile against x: (RC,) fp32 sums."""
        w = smem.slice(c * RC, RC, dim=0).load(WL).to(gl.float32)
        return gl.sum(w * x[None, :], axis=1)

    @gluon.jit
    def _g_store_rows(ptr, y, r0, rend, RC: gl.constexpr, WL: gl.constexpr):
        rs = r0 + gl.arange(0, RC, layout=gl.SliceLayout(1, WL))
        gl.store(ptr + rs, y.to(ptr.dtype.element_ty), mask=rs < rend)

    @gluon.jit
    def _g_residual(h_ptr, y, d0, dend, BD: gl.constexpr, WL: gl.constexpr):
        """h[d0:d0+BD] += y (rows < dend), rounded to the dtype as the eager residual add."""
        dt: gl.constexpr = h_ptr.dtype.element_ty
        rs = d0 + gl.arange(0, BD, layout=gl.SliceLayout(1, WL))
        hr = gl.load(h_ptr + rs, mask=rs < dend, other=0.0, cache_modifier=".cg").to(gl.float32)
        gl.store(h_ptr + rs, (hr + y.to(dt).to(gl.float32)).to(dt), mask=rs < dend)

    @gluon.jit
    def _g_swiglu(g, u, dt: gl.constexpr):
        """silu(gate) * up in fp32, rounded to the dtype where the eager MLP rounds."""
        return ((g / (1.0 + gl.exp(-g))).to(dt).to(gl.float32) * u).to(dt).to(gl.float32)

    @gluon.jit
    def _g_act(gu_ptr, F, k0, BK: gl.constexpr, WL: gl.constexpr):
        ks = k0 + gl.arange(0, BK, layout=gl.SliceLayout(0, WL))
        dt: gl.constexpr = gu_ptr.dtype.element_ty
        g = gl.load(gu_ptr + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(gl.float32)
        u = gl.load(gu_ptr + F + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(gl.float32)
        return _g_swiglu(g, u, dt)

    @gluon.jit
    def mlp_stack_smem_kernel(h_ptr, gu_ptr, wgu_ptr, nw_ptr, wd_ptr, bar_ptr, CALLS, NL, eps, H, F, P,
                              RU: gl.constexpr, BU1: gl.constexpr, BU2: gl.constexpr, RD: gl.constexpr,
                              BD: gl.constexpr, KD1: gl.constexpr, KD2: gl.constexpr, BH: gl.constexpr,
                              NW: gl.constexpr, SYNC: gl.constexpr):
        """mlp_stack_kernel with each stage's weights copied into shared memory (cp.async) as soon as the
        previous use of its buffer ends: the up share of layer i+1 streams while layer i's down stage waits and
        runs, and the reverse (DEPTH 2 without registers held)."""
        pid = gl.program_id(0)
        dt: gl.constexpr = h_ptr.dtype.element_ty
        F2 = 2 * F
        # copies 16 bytes per thread per row segment; the arithmetic a warp per row, 8 columns per thread
        WL: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])
        CL: gl.constexpr = WL
        SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        u1 = gl.allocate_shared_memory(dt, [BU1, BH], SL)
        u2 = gl.allocate_shared_memory(dt, [BU2, BH], SL)
        d1 = gl.allocate_shared_memory(dt, [BD, KD1], SL)
        d2 = gl.allocate_shared_memory(dt, [BD, KD2], SL)
        # zeroed first, so the padding past the shares is 0 whatever the masked copies write there
        u1.store(gl.zeros([BU1, BH], dt, CL))
        u2.store(gl.zeros([BU2, BH], dt, CL))
        d1.store(gl.zeros([BD, KD1], dt, CL))
        d2.store(gl.zeros([BD, KD2], dt, CL))
        _cta_barrier()
        _g_up_copy(u1, u2, wgu_ptr, 0, pid, F2, H, RU, BU1, BU2, BH, CL)
        _g_down_copy(d1, d2, wd_ptr, 0, pid, H, F, RD, BD, KD1, KD2, CL)
        hs = gl.arange(0, BH, layout=gl.SliceLayout(0, WL))
        r0 = pid * RU
        rend = gl.minimum(r0 + RU, F2)
        d0 = pid * RD
        dend = gl.minimum(d0 + RD, H)
        stage = 0
        for i in range(CALLS):
            layer = i % NL
            nxt = (i + 1) % NL
            async_copy.wait_group(1)  # this layer's up share has landed (its down share may still stream)
            _cta_barrier()
            if SYNC:
                _wait(bar_ptr, stage * P)
            x = gl.load(h_ptr + hs, mask=hs < H, other=0.0, cache_modifier=".cg").to(gl.float32)
            rstd = 1.0 / gl.sqrt(gl.sum(x * x, axis=0) / H + eps)
            nw = gl.load(nw_ptr + layer * H + hs, mask=hs < H, other=0.0).to(gl.float32)
            xn = (x * nw).to(dt).to(gl.float32)
            for c1 in gl.static_range(BU1 // NW):
                _g_store_rows(gu_ptr, _g_rows(u1, xn, NW, c1, WL) * rstd, r0 + c1 * NW, rend, NW, WL)
            for c2 in gl.static_range(BU2 // NW):
                _g_store_rows(gu_ptr, _g_rows(u2, xn, NW, c2, WL) * rstd, r0 + BU1 + c2 * NW, rend, NW, WL)
            _cta_barrier()  # every warp's rows stored and its reads of the up buffers done
            if SYNC:
                gl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            _g_up_copy(u1, u2, wgu_ptr, nxt, pid, F2, H, RU, BU1, BU2, BH, CL)
            stage += 1
            async_copy.wait_group(1)  # this layer's down share has landed
            _cta_barrier()
            if SYNC:
                _wait(bar_ptr, stage * P)
            y = _g_rows(d1, _g_act(gu_ptr, F, 0, KD1, WL), BD, 0, WL)
            y += _g_rows(d2, _g_act(gu_ptr, F, KD1, KD2, WL), BD, 0, WL)
            _g_residual(h_ptr, y, d0, dend, BD, WL)
            _cta_barrier()
            if SYNC:
                gl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            _g_down_copy(d1, d2, wd_ptr, nxt, pid, H, F, RD, BD, KD1, KD2, CL)
            stage += 1
        async_copy.wait_group(0)


if gluon is not None:
    TMA_BOX = 256  # columns per bulk copy (a TMA box is at most 256 elements along each dimension)

    @gluon.jit
    def _t_issue(desc, bar, smem, row, NK: gl.constexpr, NBYTES: gl.constexpr):
        """Bulk-copy rows [row, row + box rows) x NK boxes of TMA_BOX columns into smem[0:NK]; bar counts the bytes."""
        mbarrier.expect(bar, NBYTES)
        for j in gl.static_range(NK):
            _tma_load(desc, [row, j * 256], bar, smem.index(j))

    @gluon.jit
    def _t_rows(smem, acts, NK: gl.constexpr, c: gl.constexpr, RC: gl.constexpr, WL: gl.constexpr):
        """Rows [c RC, (c+1) RC) of a staged (NK x (rows, 256)) weight tile against the activation row staged in
        acts (NK x 256): (RC,) fp32 sums."""
        acc = gl.zeros([RC, 256], gl.float32, WL)  # products summed over the boxes first, reduced once
        for j in gl.static_range(NK):
            a = acts.slice(j, 1, dim=0).load(WL)  # (1, 256)
            acc += smem.index(j).slice(c * RC, RC, dim=0).load(WL).to(gl.float32) * a
        return gl.sum(acc, axis=1)

    @gluon.jit
    def _t_stage_acts(acts, x_ptr, nw_ptr, H, F, NKP: gl.constexpr, NORM: gl.constexpr, AL: gl.constexpr):
        """The stage's activation row, computed once and kept in shared memory as (NKP, 256) fp32: the normed
        residual row x * nw (NORM; the 1/rms scale comes after the matmul) or silu(gate) * up of the (2F,) row x.
        Every load is issued at once (one 2-D tile), so their latencies overlap."""
        rows = gl.arange(0, NKP, layout=gl.SliceLayout(1, AL))
        cols = gl.arange(0, 256, layout=gl.SliceLayout(0, AL))
        ks = rows[:, None] * 256 + cols[None, :]
        dt: gl.constexpr = x_ptr.dtype.element_ty
        if NORM:
            x = gl.load(x_ptr + ks, mask=ks < H, other=0.0, cache_modifier=".cg").to(gl.float32)
            w = gl.load(nw_ptr + ks, mask=ks < H, other=0.0).to(gl.float32)
            a = (x * w).to(dt).to(gl.float32)
        else:
            g = gl.load(x_ptr + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(gl.float32)
            u = gl.load(x_ptr + F + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(gl.float32)
            a = _g_swiglu(g, u, dt)
        _cta_barrier()  # the previous stage's reads of acts are done
        acts.store(a)
        _cta_barrier()

    @gluon.jit
    def mlp_stack_tma_kernel(h_ptr, gu_ptr, du1, du2, nw_ptr, dd, bar_ptr, CALLS, NL, eps, H, F, P,
                             RU: gl.constexpr, BU1: gl.constexpr, BU2: gl.constexpr, RD: gl.constexpr,
                             BD: gl.constexpr, NKH: gl.constexpr, NKF: gl.constexpr, BH: gl.constexpr,
                             NKP: gl.constexpr, NW: gl.constexpr, SYNC: gl.constexpr):
        """mlp_stack_kernel with each stage's weights bulk-copied (TMA) into shared memory as soon as the previous
        use of its buffers ends (the up share of layer i+1 streams while layer i's down stage waits and runs)."""
        pid = gl.program_id(0)
        dt: gl.constexpr = h_ptr.dtype.element_ty
        F2 = 2 * F
        WL: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])
        HL: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
        u1 = gl.allocate_shared_memory(dt, [NKH, BU1, 256], SL)
        u2 = gl.allocate_shared_memory(dt, [NKH, BU2, 256], SL)
        dw = gl.allocate_shared_memory(dt, [NKF, BD, 256], SL)
        AL: gl.constexpr = WL
        acts = gl.allocate_shared_memory(gl.float32, [NKP, 256], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        bu = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bu2 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bd = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bu, count=1)
        mbarrier.init(bu2, count=1)
        mbarrier.init(bd, count=1)
        UB1: gl.constexpr = NKH * BU1 * 256 * 2
        UB2: gl.constexpr = NKH * BU2 * 256 * 2
        DB: gl.constexpr = NKF * BD * 256 * 2
        r0 = pid * RU
        rend = gl.minimum(r0 + RU, F2)
        d0 = pid * RD
        dend = gl.minimum(d0 + RD, H)
        _t_issue(du1, bu, u1, r0, NKH, UB1)
        _t_issue(du2, bu2, u2, r0 + BU1, NKH, UB2)
        _t_issue(dd, bd, dw, d0, NKF, DB)
        hs = gl.arange(0, BH, layout=HL)
        phase = 0
        stage = 0
        for i in range(CALLS):
            layer = i % NL
            nxt = (i + 1) % NL
            mbarrier.wait(bu, phase)
            mbarrier.wait(bu2, phase)
            if SYNC:
                _wait(bar_ptr, stage * P)
            x = gl.load(h_ptr + hs, mask=hs < H, other=0.0, cache_modifier=".cg").to(gl.float32)
            rstd = 1.0 / gl.sqrt(gl.sum(x * x, axis=0) / H + eps)
            _t_stage_acts(acts, h_ptr, nw_ptr + layer * H, H, F, NKP, True, AL)
            RC: gl.constexpr = 2 * NW if BU2 % (2 * NW) == 0 else NW  # rows per pass: two per warp where they divide
            for c1 in gl.static_range(BU1 // RC):
                _g_store_rows(gu_ptr, _t_rows(u1, acts, NKH, c1, RC, WL) * rstd, r0 + c1 * RC, rend, RC, WL)
            for c2 in gl.static_range(BU2 // RC):
                _g_store_rows(gu_ptr, _t_rows(u2, acts, NKH, c2, RC, WL) * rstd, r0 + BU1 + c2 * RC, rend, RC, WL)
            _cta_barrier()  # every warp's rows stored and its reads of the up buffers done
            if SYNC:
                gl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            _t_issue(du1, bu, u1, nxt * F2 + r0, NKH, UB1)
            _t_issue(du2, bu2, u2, nxt * F2 + r0 + BU1, NKH, UB2)
            stage += 1
            mbarrier.wait(bd, phase)
            if SYNC:
                _wait(bar_ptr, stage * P)
            _t_stage_acts(acts, gu_ptr, nw_ptr, H, F, NKP, False, AL)
            y = _t_rows(dw, acts, NKF, 0, BD, WL)
            _g_residual(h_ptr, y, d0, dend, BD, WL)
            _cta_barrier()
            if SYNC:
                gl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            _t_issue(dd, bd, dw, nxt * H + d0, NKF, DB)
            stage += 1
            phase ^= 1
        mbarrier.wait(bu, phase)
        mbarrier.wait(bu2, phase)
        mbarrier.wait(bd, phase)


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class PersistentMLPStack:
    """The dense MLP layers of a model as one persistent launch of `calls` layers (layer i % len on call i)."""

    def __init__(self, layers, programs: int, depth: int, warps: int, sync: bool = True, smem: str = ""):
        """smem: "" (weights held in registers), "cp.async" or "tma" (staged in shared memory, Gluon)."""
        ff = [l.feed_forward for l in layers]
        self.H = ff[0].down_proj.weight.shape[0]
        self.F = ff[0].down_proj.weight.shape[1]
        if ff[0].down_proj.weight.dtype != torch.bfloat16 or self.H % 2 or self.F % 2:
            raise ValueError("the persistent MLP kernel takes bf16 weights of even widths (read as int32 pairs)")
        if smem and gluon is None:
            raise RuntimeError("the shared-memory variant needs Triton's Gluon dialect (Triton >= 3.5)")
        self.wgu16 = torch.stack([torch.cat([f.gate_proj.weight, f.up_proj.weight]) for f in ff])
        self.wd16 = torch.stack([f.down_proj.weight for f in ff]).contiguous()
        self.wgu, self.wd = self.wgu16.view(torch.int32), self.wd16.view(torch.int32)
        self.smem = smem
        if smem == "tma":
            self.nkh, self.nkf = -(-self.H // TMA_BOX), -(-self.F // TMA_BOX)
        self.nw = torch.stack([l.pre_ff_layernorm.weight for l in layers]).contiguous()
        self.eps = layers[0].pre_ff_layernorm.eps
        self.NL = len(layers)
        dev, dt = self.nw.device, ff[0].down_proj.weight.dtype
        self.gu = torch.empty(2 * self.F, device=dev, dtype=dt)
        self.bar = torch.zeros(1, device=dev, dtype=torch.int32)
        self.P, self.depth, self.warps, self.sync = programs, depth, warps, sync
        ru = -(-2 * self.F // programs)
        bu1 = _pow2_floor(ru)
        self.RU, self.BU1, self.BU2 = ru, bu1, _pow2_ceil(max(ru - bu1, 1))
        self.RD = -(-self.H // programs)
        self.BD = _pow2_ceil(self.RD)
        self.KD1 = _pow2_floor(self.F // 2)
        self.KD2 = _pow2_ceil(max(self.F // 2 - self.KD1, 1))
        if smem == "tma":
            layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
            wgu2, wd2 = self.wgu16.reshape(-1, self.H), self.wd16.reshape(-1, self.F)
            self.descs = [TensorDescriptor.from_tensor(wgu2, [self.BU1, TMA_BOX], layout),
                          TensorDescriptor.from_tensor(wgu2, [self.BU2, TMA_BOX], layout),
                          TensorDescriptor.from_tensor(wd2, [self.BD, TMA_BOX], layout)]

    def _launch(self, h, calls: int, warmup: bool = False):
        if self.smem == "tma":
            kernel = mlp_stack_tma_kernel
        else:
            kernel = mlp_stack_smem_kernel if self.smem == "cp.async" else mlp_stack_kernel
        fn = kernel.warmup if warmup else kernel[(self.P,)]
        kw = dict(grid=(self.P,)) if warmup else {}
        if self.smem == "tma":
            du1, du2, dd = self.descs
            return fn(h, self.gu, du1, du2, self.nw, dd, self.bar, calls, self.NL, self.eps, self.H, self.F, self.P,
                      RU=self.RU, BU1=self.BU1, BU2=self.BU2, RD=self.RD, BD=self.BD, NKH=self.nkh, NKF=self.nkf,
                      BH=_pow2_ceil(self.H), NKP=_pow2_ceil(max(self.nkh, self.nkf)), NW=self.warps, SYNC=self.sync,
                      num_warps=self.warps, **kw)
        if self.smem:
            return fn(h, self.gu, self.wgu16, self.nw, self.wd16, self.bar, calls, self.NL, self.eps, self.H, self.F,
                      self.P, RU=self.RU, BU1=self.BU1, BU2=self.BU2, RD=self.RD, BD=self.BD, KD1=2 * self.KD1,
                      KD2=2 * self.KD2, BH=_pow2_ceil(self.H), NW=self.warps, SYNC=self.sync, num_warps=self.warps,
                      **kw)
        return fn(h, self.gu, self.wgu, self.nw, self.wd, self.bar, calls, self.NL, self.eps, self.H, self.F, self.P,
                  RU=self.RU, BU1=self.BU1, BU2=self.BU2, RD=self.RD, BD=self.BD, KD1=self.KD1, KD2=self.KD2,
                  BHW=_pow2_ceil(self.H // 2), DEPTH=self.depth, SYNC=self.sync, num_warps=self.warps, **kw)

    def resident(self, h) -> int:
        """How many programs of the compiled kernel fit on one SM at once (registers, shared memory, threads)."""
        k = self._launch(h, 1, warmup=True)
        k._init_handles()  # loads the binary: n_regs is known from here
        regs_per_warp = -(-k.n_regs * 32 // 256) * 256
        props = torch.cuda.get_device_properties(h.device)
        by_regs = props.regs_per_multiprocessor // (regs_per_warp * self.warps)
        smem = k.metadata.shared
        by_smem = props.shared_memory_per_multiprocessor // smem if smem else 32
        by_threads = props.max_threads_per_multi_processor // (32 * self.warps)
        return min(by_regs, by_smem, by_threads)

    def __call__(self, h, calls: int):
        self.bar.zero_()
        return self._launch(h, calls)


def eager_mlp_stack(h, layers, calls: int):
    for i in range(calls):
        layer = layers[i % len(layers)]
        h = h + layer.feed_forward(layer.pre_ff_layernorm(h))
    return h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-1b")
    p.add_argument("--calls", type=int, default=64, help="MLP layers per launch / per captured graph")
    p.add_argument("--variants", default="1:8,2:8,1:8:nosync,2:8:nosync,1:8:l2,1:8:nosync-l2,2:8:smem,2:8:smem-nosync,"
                                         "2:8:tma,2:16:tma,2:8:tma-nosync,2:8:tma-l2,2:8:tma-nosync-l2",
                   help="DEPTH:WARPS[:FLAGS] of the persistent kernel; flags (joined by -): nosync drops the "
                        "barriers (timing only), l2 repeats the first layer (its weights stay in L2), smem stages "
                        "the weights in shared memory by cp.async, tma by bulk copies (Gluon; DEPTH is then 2)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_persistent_mlp needs a CUDA GPU (grid-wide barriers between resident programs)")
    from bench_l2_resident import graph_us_per_call
    from openjamba.bench.common import build_model, machine
    from openjamba.config import JambaConfig
    from openjamba.inference import FusedDecodeStep

    model = build_model(JambaConfig.from_name(args.preset), "cuda", torch.bfloat16)
    layers = [l for l in model.model.layers if not l.is_moe]
    ff = layers[0].feed_forward
    nbytes = sum(w.numel() * w.element_size() for w in (ff.gate_proj.weight, ff.up_proj.weight, ff.down_proj.weight))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    h0 = (torch.randn(1, model.config.hidden_size, device="cuda") * 0.5).to(model.dtype)
    h = h0.clone()
    with torch.inference_mode():
        ref = eager_mlp_stack(h0.clone(), layers, 8)
    rows = []
    bad = []  # persistent variants whose result strays from eager by more than the fused step's does
    step = FusedDecodeStep(model, 1, split=False)  # the kernel chain: each piece updates h in place
    for order in ("layers in turn", "same layer"):
        seq = layers if order == "layers in turn" else layers[:1]

        def fused_run():
            h.copy_(h0)
            for i in range(args.calls):
                step.ffn(h, seq[i % len(seq)])

        err = None
        if order == "layers in turn":
            with torch.inference_mode():
                h.copy_(h0)
                for i in range(8):
                    step.ffn(h, layers[i % len(layers)])
            err = fused_err = (h.float() - ref.float()).abs().max().item()
        t = graph_us_per_call(fused_run, args.calls)
        rows.append(dict(kernel="fused step (ffn_up + down_residual, PDL)", order=order, us_per_layer=t,
                         max_err_8_layers=err))
        print(f"fused step kernels, {order:<15} {min(t):7.2f} us per layer ({', '.join(f'{v:.2f}' for v in t)})"
              + (f", error after 8 layers {err:.3g}" if err is not None else ""), flush=True)
    for v in args.variants.split(","):
        depth, warps, *flags = v.split(":")
        depth, warps, flags = int(depth), int(warps), set(flags[0].split("-")) if flags else set()
        sync, order = "nosync" not in flags, "same layer" if "l2" in flags else "layers in turn"
        seq = layers[:1] if "l2" in flags else layers
        smem = "tma" if "tma" in flags else "cp.async" if "smem" in flags else ""
        stack = PersistentMLPStack(seq, sms, depth, warps, sync=sync, smem=smem)
        name = (f"persistent, {f'{smem} into shared memory' if smem else f'depth {depth}'}, {warps} warps, "
                f"{'barriers' if sync else 'no barriers'}, {order}")
        try:
            if stack.resident(h) < 1:
                raise RuntimeError(f"a program of {warps} warps does not fit on an SM")
            with torch.inference_mode():
                h.copy_(h0)
                k = stack(h, 8)
                torch.cuda.synchronize()
        except Exception as e:  # e.g. too many registers for one program of this many warps
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.append(dict(kernel=name, failed=str(e)[:500]))
            continue
        regs = dict(registers=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None))
        err = (h.float() - ref.float()).abs().max().item() if sync and order == "layers in turn" else None
        if err is not None and err > 2 * fused_err + 0.016:  # bf16 steps of |h| ~ 2 are 0.0156
            bad.append(name)

        def run():
            h.copy_(h0)
            stack(h, args.calls)

        t = graph_us_per_call(run, args.calls)
        rows.append(dict(kernel=name, depth=depth, warps=warps, programs=sms, barriers=sync, order=order,
                         us_per_layer=t, max_err_8_layers=err, **regs))
        print(f"{name:<62} {min(t):7.2f} us per layer ({', '.join(f'{x:.2f}' for x in t)})"
              + (f", error after 8 layers {err:.3g}" if err is not None else "") + f", {regs}", flush=True)
    bound = nbytes / BANDWIDTH * 1e6
    print(f"weights per layer {nbytes / 1e6:.1f} MB: {bound:.2f} us at 4.27 TB/s; |h| after 8 layers "
          f"{ref.float().abs().max().item():.3g}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"persistent_mlp_{torch.cuda.get_device_name().split()[-1].lower()}.json")
    with open(out, "w") as f:
        json.dump(dict(benchmark="dense MLP stack: persistent kernel vs the fused step's PDL kernel chain",
                       preset=args.preset, batch=1, dtype="bfloat16", calls=args.calls, weight_bytes_per_layer=nbytes,
                       bandwidth_bound_us_per_layer=bound, machine=machine(), rows=rows), f, indent=1)
    print(f"wrote {out}")
    if bad:
        print(f"results differ from the eager layers: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
