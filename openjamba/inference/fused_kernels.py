"""Triton kernels of the fused one-token decoding step (see inference/fused.py for how they are chained).

A decoding step at small batch reads every active weight once and does almost no arithmetic, so its
time is the weight bytes plus one launch per kernel. These kernels cut the launches: each one computes the
RMSNorm of its input rows itself, in the same pass as its matmul, so a norm never needs a kernel of its
own, and each fuses the elementwise work around its matmul:

    mamba_in     RMSNorm -> in_proj (u and z) -> causal-conv update (state shifted in place) + SiLU
                 -> x_proj, written as per-channel-block partial sums (split mixers: added into XS rows)
    mamba_ssm    sum of the x_proj partials -> dt/B/C RMSNorms -> dt_proj -> softplus -> SSM state update
                 (in place) -> C contraction + D skip -> silu(z) gate
    router       RMSNorm -> router logits -> softmax -> top-k weights per expert (MoE layers; one row after a
                 split Mamba mixer: folded into its mamba_ssm by linearity, no kernel, see mamba_ssm_kernel FOLD)
    ffn_up       RMSNorm -> gate/up of the routed experts only (or the dense MLP) -> SiLU * up
    down_residual  down projection of the routed experts (or one linear layer), weighted sum over experts,
                 residual add in place (MoE and MLP down, Mamba out_proj, attention o_proj)
    qkv          RMSNorm -> an attention layer's q, k and v projections, k and v written into the cache
    norm_linear  RMSNorm -> one linear layer (the lm_head)

Split layers (one row, see inference/fused.py): mamba_ssm with OUT also computes its channels' share of the
out_proj, and ffn_split runs a whole MLP or MoE layer (routing, gate/up, its F block's share of down); each
adds its share to an fp32 accumulator with atomic adds (_down_split). Every kernel that reads the residual
stream can take such a pending output (ACC) and adds it as it reads (_x_tile, _pending_add).

Every weight is read once for all rows of the batch. Up to a few rows the matmuls are GEMVs (products
summed in registers); above that the rows are padded to a tile of at least 16 and each matmul is a
tensor-core `tl.dot` (DOT). Roundings to the model
dtype happen where the eager layers round (after each linear layer and activation, and each residual
add), so the fused step follows the eager step closely in bf16 and matches it in fp32; the one change of
order is the RMSNorm, whose 1/rms row scale is applied after the matmul it feeds (see _matmul).

Packed words (PACK: one row, bf16 weights, reduction lengths that are multiples of 16): a GEMV reads its weight
tile as int32 words of two bf16 each and widens the halves with one shift (the even element) or one mask (the
odd one), multiplying them in the tile's own register layout with the row's even and odd elements
(_x_halves); each thread sums its products in registers, then a row's threads reduce across the warp. The
element form's (BB, BN, BK) broadcast takes a layout the loaded tile lacks, so its weights pass through shared
memory first, and each bf16 is widened alone. For sm_90, gate/up of 16 rows over 8 warps at jamba-1b sizes
compiles to 944 instructions against 1168, with 55 shared-memory accesses and 14 barriers against 122 and 32;
the packed form runs best with such blocks of whole rows (fused.TILES), the element form with one-warp blocks
of 2 rows (fused.ELEMENT_TILES). The sums are the same products in another order, so the results match the
element form's to fp32 rounding.

PDL (programmatic dependent launch, compute capability >= 9): each kernel may start while the previous one
finishes. It first loads what the previous kernel does not write (its weights, its layer's conv or SSM
state, the residual stream, the routing of two kernels back), then waits for the previous kernel
(_after_previous_kernel), so the weight stream of one kernel overlaps the tail of the one before it and
after the wait only the previous kernel's outputs are still to be read: one round trip. When a kernel
launches, every kernel before the previous one has finished, because the previous one launched it only
after its own wait (see _after_previous_kernel); loads of data those kernels wrote bypass L1 (".cg").
ffn_up's expert weights depend on the routing computed just before it, so they are read after the wait.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..ops.selective_scan import _interp_compat  # noqa: F401  (CPU interpreter only)
from ..ops.selective_scan._kernels import LOG2E, _softplus

try:  # programmatic dependent launch: Triton >= 3.4, GPUs of compute capability >= 9
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:  # the kernels then run with PDL=False only
    gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """PDL (programmatic dependent launch): the kernel was launched while the one before it was still running,
    and until here it has read nothing but model weights (which no kernel of the step writes). Wait for the
    previous kernel to finish (its writes, and those of every kernel before it, are then visible), then let
    the next kernel launch and start streaming its own weights."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _row_block(pid, NRB: tl.constexpr, BB: tl.constexpr):
    """Batches above one row tile run as NRB row blocks of BB rows, along the grid's first axis with the
    output blocks: program pid -> (its output block, its first row). The row blocks of one output block
    are neighbours in launch order, so the later ones can find that block's weights in L2."""
    return pid // NRB, (pid % NRB) * BB


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: exact fp32 products of the inputs as fp32 (for fp32 models: no
    TF32 rounding; and on the CPU interpreter, whose 16-bit dot is wrong)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _mm(x, w, IEEE: tl.constexpr, DOT: tl.constexpr):
    """x (BB, BK) @ w (BN, BK)^T -> (BB, BN) fp32. DOT: a tensor-core tl.dot (BB, BN >= 16); otherwise
    products summed in registers, the faster form for one to a few rows (a GEMV: no shared-memory staging)."""
    if DOT:
        return _dot(x, tl.trans(w), IEEE)
    else:
        return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _w_tile(w_ptr, s_wn, n0, N, k0, K, BN: tl.constexpr, BK: tl.constexpr, PACK: tl.constexpr = False):
    """W[n0:n0+BN, k0:k0+BK] of a row-major weight (N, K) with row stride s_wn; 0 outside. PACK (bf16 weights; K,
    s_wn and k0 multiples of 16): the same tile as (BN, BK // 2) int32 words holding two bf16 each (_halves)."""
    ns = n0 + tl.arange(0, BN)
    if PACK:
        ks = k0 // 2 + tl.arange(0, BK // 2)
        offs = ns[:, None] * tl.multiple_of(s_wn // 2, 8) + ks[None, :]
        return tl.load(_words(w_ptr) + offs, mask=(ns[:, None] < N) & (ks[None, :] < tl.multiple_of(K // 2, 8)),
                       other=0)
    else:
        ks = k0 + tl.arange(0, BK)
        return tl.load(w_ptr + ns[:, None] * s_wn + ks[None, :], mask=(ns[:, None] < N) & (ks[None, :] < K),
                       other=0.0)


@triton.jit
def _words(p):
    """A bf16 pointer as a pointer to int32 words, two bf16 each (the even-indexed one in the low half)."""
    return p.to(tl.pointer_type(tl.int32), bitcast=True)


@triton.jit
def _halves(words):
    """int32 words of two bf16 -> (low, high) halves as fp32, exactly: a bf16 is the top half of an fp32, so one
    shift or one mask widens each (the element form's conversions take more, and its product layout a pass
    through shared memory)."""
    return (words << 16).to(tl.float32, bitcast=True), (words & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _x_halves(x_ptr, nw_ptr, k0, K, BKW: tl.constexpr, NORM: tl.constexpr, a_ptr=None, ACC: tl.constexpr = False):
    """The packed form's row (one row, bf16): x[k0:k0+2 BKW] as its even- and odd-indexed elements (BKW,) fp32
    (0 past K) and their sum of squares; NORM, ACC as in _x_tile (the same roundings)."""
    ks = k0 // 2 + tl.arange(0, BKW)
    m = ks < tl.multiple_of(K // 2, 8)
    xl, xh = _halves(tl.load(_words(x_ptr) + ks, mask=m, other=0))
    dt = x_ptr.dtype.element_ty
    if ACC:
        xl = (xl + tl.load(a_ptr + 2 * ks, mask=m, other=0.0, cache_modifier=".cg").to(dt).to(tl.float32)).to(dt)
        xh = (xh + tl.load(a_ptr + 2 * ks + 1, mask=m, other=0.0, cache_modifier=".cg").to(dt).to(tl.float32)).to(dt)
        xl, xh = xl.to(tl.float32), xh.to(tl.float32)
    if NORM:
        ss = tl.sum(xl * xl + xh * xh, axis=0)
        nl, nh = _halves(tl.load(_words(nw_ptr) + ks, mask=m, other=0))
        xl, xh = (xl * nl).to(dt).to(tl.float32), (xh * nh).to(dt).to(tl.float32)
    else:
        ss = 0.0
    return xl, xh, ss


@triton.jit
def _mm_halves(xl, xh, w):
    """(1, BN) fp32 = x @ W^T for a word tile w (BN, BKW) from _w_tile(PACK) and x's halves from _x_halves: the
    products in w's own layout, each thread's share summed in registers, then across the threads of a row."""
    wl, wh = _halves(w)
    return tl.sum(wl * xl[None, :] + wh * xh[None, :], axis=1)[None, :]


@triton.jit
def _pending_add(x, a_ptrs, mask):
    """The residual x plus the pending split-layer output at a_ptrs (fp32, from atomics), rounded as the eager
    layers round: the layer's output to the dtype, then the sum."""
    out = tl.load(a_ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(x.dtype).to(tl.float32)
    return (x.to(tl.float32) + out).to(x.dtype)


@triton.jit
def _x_tile(x_ptr, s_xb, nw_ptr, B, k0, K, BB: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, a_ptr=None,
            ACC: tl.constexpr = False):
    """X[:B, k0:k0+BK] in x's dtype (0 outside) and the fp32 sums of squares of its rows. NORM: multiplied
    by the RMSNorm weight nw and rounded to the dtype (the 1/rms row scale comes after the matmul). ACC: x is
    a residual stream with a split layer's output still pending in the fp32 accumulator a (same layout): the
    residual add happens here, rounded as the eager layers round (x + out, out rounded to the dtype first)."""
    rows = tl.arange(0, BB)
    ks = k0 + tl.arange(0, BK)
    m = (rows[:, None] < B) & (ks[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * s_xb + ks[None, :], mask=m, other=0.0)
    if ACC:
        x = _pending_add(x, a_ptr + rows[:, None] * s_xb + ks[None, :], m)
    if NORM:
        xf = x.to(tl.float32)
        ss = tl.sum(xf * xf, axis=1)
        x = (xf * tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
    else:
        ss = tl.zeros((BB,), tl.float32)
    return x, ss


@triton.jit
def _matmul(x_ptr, s_xb, nw_ptr, eps, w0, w_ptr, s_wn, n0, N, B, K,
            BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
            DOT: tl.constexpr, a_ptr=None, ACC: tl.constexpr = False, PACK: tl.constexpr = False):
    """(BB, BN) fp32 = X[:B] @ W[n0:n0+BN]^T for a row-major W (N, K) whose first tile w0 = W[n0:, :BK] the
    caller loaded already (before _after_previous_kernel: the weight stream starts while the previous kernel
    finishes; with BK >= K that is the whole share of W). NORM: X = RMSNorm(x) with weight nw, in the same
    pass: the row scale 1/rms commutes with the matmul, so the dot takes (x * nw) rounded to the dtype and the
    accumulated rows are scaled at the end. Padded rows and columns are 0. PACK (one row, bf16): w0 and the
    tiles after it are int32 words (_w_tile), the row read as its halves (_x_halves)."""
    if PACK:
        xl, xh, ss = _x_halves(x_ptr, nw_ptr, 0, K, BK // 2, NORM, a_ptr, ACC)
        acc = _mm_halves(xl, xh, w0)
        for k0 in range(BK, K, BK):
            xl, xh, s = _x_halves(x_ptr, nw_ptr, k0, K, BK // 2, NORM, a_ptr, ACC)
            ss += s
            acc += _mm_halves(xl, xh, _w_tile(w_ptr, s_wn, n0, N, k0, K, BN, BK, True))
        if NORM:
            acc = acc * (1.0 / tl.sqrt(ss / K + eps))
    else:
        x, ss = _x_tile(x_ptr, s_xb, nw_ptr, B, 0, K, BB, BK, NORM, a_ptr, ACC)
        acc = _mm(x, w0, IEEE, DOT)
        for k0 in range(BK, K, BK):
            x, s = _x_tile(x_ptr, s_xb, nw_ptr, B, k0, K, BB, BK, NORM, a_ptr, ACC)
            ss += s
            acc += _mm(x, _w_tile(w_ptr, s_wn, n0, N, k0, K, BN, BK), IEEE, DOT)
        if NORM:
            acc = acc * (1.0 / tl.sqrt(ss / K + eps))[:, None]
    return acc


@triton.jit
def norm_linear_kernel(h_ptr, s_hb, a_ptr, nw_ptr, eps, w_ptr, bias_ptr, y_ptr, s_yb, B, H, N,
                       HAS_BIAS: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       IEEE: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr, NRB: tl.constexpr,
                       ACC: tl.constexpr, PACK: tl.constexpr):
    """y (B, N) = Linear(RMSNorm(h)), in y's dtype (ACC: h + the pending output a, see _x_tile). Grid:
    (cdiv(N, BN) * NRB,). PACK: see _matmul."""
    blk, r0 = _row_block(tl.program_id(0), NRB, BB)
    n0 = blk * BN
    h_ptr += r0 * s_hb
    a_ptr += r0 * s_hb
    y_ptr += r0 * s_yb
    nb = B - r0  # rows in this block (up to BB)
    w0 = _w_tile(w_ptr, H, n0, N, 0, H, BN, BK, PACK)
    _after_previous_kernel(PDL)
    acc = _matmul(h_ptr, s_hb, nw_ptr, eps, w0, w_ptr, H, n0, N, nb, H, BB, BN, BK, True, IEEE, DOT, a_ptr, ACC,
                  PACK)
    ns = n0 + tl.arange(0, BN)
    rows = tl.arange(0, BB)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * s_yb + ns[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < nb) & (ns[None, :] < N))


@triton.jit
def qkv_kernel(h_ptr, s_hb, a_ptr, nw_ptr, eps, wq_ptr, wk_ptr, wv_ptr, q_ptr, k_ptr, v_ptr, s_kb, s_kh, pos_ptr,
               B, H, NQ, NKV, HD, L, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
               DOT: tl.constexpr, PDL: tl.constexpr, NRB: tl.constexpr, ACC: tl.constexpr, PACK: tl.constexpr,
               POS_LATE: tl.constexpr):
    """An attention layer's q, k and v projections of RMSNorm(h) in one launch; k and v go straight into
    the caches at the current position. Grid ((cdiv(NQ, BN) + 2 cdiv(NKV, BN)) * NRB,): the first programs
    compute q (B, NQ); the next k, then v (B, NKV), written at k_ptr[b, n // HD, pos, n % HD] of a
    (B, Hkv, L, HD) cache with batch and head strides s_kb, s_kh (nothing is written once pos reaches L:
    callers check the room on the host). pos (a device scalar) was last written before the step began, at least
    two kernels back, so it is read before the wait; POS_LATE (the model's first layer, where next_token_kernel may
    have written it just before): after the wait."""
    pid, r0 = _row_block(tl.program_id(0), NRB, BB)
    h_ptr += r0 * s_hb
    a_ptr += r0 * s_hb
    q_ptr += r0 * NQ
    k_ptr += r0.to(tl.int64) * s_kb
    v_ptr += r0.to(tl.int64) * s_kb
    nb = B - r0
    nq = tl.cdiv(NQ, BN)
    nkv = tl.cdiv(NKV, BN)
    if pid < nq:
        w_ptr, N, n0 = wq_ptr, NQ, pid * BN
    elif pid < nq + nkv:
        w_ptr, N, n0 = wk_ptr, NKV, (pid - nq) * BN
    else:
        w_ptr, N, n0 = wv_ptr, NKV, (pid - nq - nkv) * BN
    w0 = _w_tile(w_ptr, H, n0, N, 0, H, BN, BK, PACK)
    if not POS_LATE:
        pos = tl.load(pos_ptr).to(tl.int64)
    _after_previous_kernel(PDL)
    if POS_LATE:
        pos = tl.load(pos_ptr, cache_modifier=".cg").to(tl.int64)
    acc = _matmul(h_ptr, s_hb, nw_ptr, eps, w0, w_ptr, H, n0, N, nb, H, BB, BN, BK, True, IEEE, DOT, a_ptr, ACC,
                  PACK)
    ns = n0 + tl.arange(0, BN)
    rows = tl.arange(0, BB)
    m2 = (rows[:, None] < nb) & (ns[None, :] < N)
    y = acc.to(h_ptr.dtype.element_ty)
    if pid < nq:
        tl.store(q_ptr + rows[:, None] * NQ + ns[None, :], y, mask=m2)
    else:
        dst = k_ptr if pid < nq + nkv else v_ptr
        heads = (ns // HD).to(tl.int64)
        offs = rows[:, None].to(tl.int64) * s_kb + heads[None, :] * s_kh + pos * HD + (ns % HD)[None, :]
        room = (pos + 0 * ns) < L  # (BN,)
        tl.store(dst + offs, y, mask=m2 & room[None, :])


@triton.jit
def mamba_in_kernel(
    h_ptr, s_hb, a_ptr, nw_ptr, eps, win_ptr, bin_ptr, conv_ptr, s_cb, s_ck, cw_ptr, cb_ptr, wx_ptr,
    u_ptr, z_ptr, xpart_ptr, B, H, Di, NX,
    HAS_BIN: tl.constexpr, HAS_CB: tl.constexpr, KC: tl.constexpr, KP: tl.constexpr, NU: tl.constexpr,
    BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BX: tl.constexpr, IEEE: tl.constexpr,
    DOT: tl.constexpr, PDL: tl.constexpr, NRB: tl.constexpr, ACC: tl.constexpr, PACK: tl.constexpr,
    XS: tl.constexpr,
):
    """Grid (2 NU * NRB,). Programs [0, NU): BD channels of u = in_proj(RMSNorm(h))[:, :Di], the conv
    update of those channels (conv state (B, KC-1, Di) shifted in place) + SiLU -> u (B, Di), and their
    share of x_proj: xpart[p] (B, NX) fp32, or with XS > 0 (one row) that share added by atomic adds into
    xpart[p % XS] (zeroed before), so that mamba_ssm sums XS rows instead of NU. Programs [NU, 2 NU): BD
    channels of z = in_proj(...)[:, Di:] -> z (B, Di). ACC: h + the pending output a (see _x_tile). PACK:
    in_proj as in _matmul. KP: the KC - 1 conv state rows padded to a power of two."""
    pid, r0 = _row_block(tl.program_id(0), NRB, BB)
    h_ptr += r0 * s_hb
    a_ptr += r0 * s_hb
    conv_ptr += r0 * s_cb
    u_ptr += r0 * Di
    z_ptr += r0 * Di
    xpart_ptr += r0 * NX
    rows = tl.arange(0, BB)
    rmask = rows < B - r0
    dt = h_ptr.dtype.element_ty
    if pid < NU:
        d0 = pid * BD
        ds = d0 + tl.arange(0, BD)
        dmask = ds < Di
        xs = tl.arange(0, BX)
        # before the wait: this block's in_proj tile, its x_proj columns (NX, Di)[:, ds] as (BX, BD), the conv
        # weights and the conv state rows (BB, KP, BD) (last written by this kernel a token ago)
        w0 = _w_tile(win_ptr, H, d0, Di, 0, H, BD, BK, PACK)
        wx = tl.load(wx_ptr + xs[:, None] * Di + ds[None, :], mask=(xs[:, None] < NX) & dmask[None, :], other=0.0)
        m2 = rmask[:, None] & dmask[None, :]
        js = tl.arange(0, KP)
        jmask = js < KC - 1
        m3 = rmask[:, None, None] & jmask[None, :, None] & dmask[None, None, :]
        s_ptrs = conv_ptr + rows[:, None, None] * s_cb + js[None, :, None] * s_ck + ds[None, None, :]
        cstate = tl.load(s_ptrs, mask=m3, other=0.0, cache_modifier=".cg")
        cw = tl.load(cw_ptr + ds[None, :] * KC + js[:, None], mask=jmask[:, None] & dmask[None, :], other=0.0)
        cw_x = tl.load(cw_ptr + ds * KC + (KC - 1), mask=dmask, other=0.0).to(tl.float32)
        bias = tl.zeros((BD,), tl.float32)
        if HAS_CB:
            bias = tl.load(cb_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
        _after_previous_kernel(PDL)
        acc = _matmul(h_ptr, s_hb, nw_ptr, eps, w0, win_ptr, H, d0, Di, B - r0, H, BB, BD, BK, True, IEEE, DOT,
                      a_ptr, ACC, PACK)
        if HAS_BIN:
            acc += tl.load(bin_ptr + ds, mask=dmask, other=0.0).to(tl.float32)[None, :]
        x = acc.to(dt).to(tl.float32)  # in_proj output in the model dtype
        # causal conv over [state_0 .. state_{KC-2}, x], then the state shifts left by one
        y = tl.sum(cstate.to(tl.float32) * cw.to(tl.float32)[None, :, :], axis=1)
        y += x * cw_x[None, :] + bias[None, :]
        tl.store(s_ptrs - s_ck, cstate, mask=m3 & (js >= 1)[None, :, None])
        if KC > 1:
            tl.store(conv_ptr + rows[:, None] * s_cb + (KC - 2) * s_ck + ds[None, :], x.to(dt), mask=m2)
        uc = (y * tl.sigmoid(y)).to(dt)
        tl.store(u_ptr + rows[:, None] * Di + ds[None, :], uc, mask=m2)
        # this block's share of x_proj: (BB, BD) @ (BX, BD)^T
        part = _mm(tl.where(m2, uc, 0.0).to(dt), wx, IEEE, DOT)
        pmask = rmask[:, None] & (xs[None, :] < NX)
        if XS > 0:
            tl.atomic_add(xpart_ptr + (pid % XS) * NX + xs[None, :], part, mask=pmask, sem="relaxed")
        else:
            tl.store(xpart_ptr + pid * B * NX + rows[:, None] * NX + xs[None, :], part, mask=pmask)
    else:
        d0 = (pid - NU) * BD
        ds = d0 + tl.arange(0, BD)
        w0 = _w_tile(win_ptr + Di * H, H, d0, Di, 0, H, BD, BK, PACK)
        _after_previous_kernel(PDL)
        acc = _matmul(h_ptr, s_hb, nw_ptr, eps, w0, win_ptr + Di * H, H, d0, Di, B - r0, H, BB, BD, BK, True, IEEE,
                      DOT, a_ptr, ACC, PACK)
        if HAS_BIN:
            acc += tl.load(bin_ptr + Di + ds, mask=ds < Di, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + rows[:, None] * Di + ds[None, :], acc.to(dt), mask=rmask[:, None] & (ds[None, :] < Di))


@triton.jit
def _segment_w(w_ptr, xs, lo, hi):
    """The RMSNorm weight of x_proj columns [lo, hi) at their places in a full-width vector (fp32); 0 elsewhere."""
    return tl.load(w_ptr + (xs - lo), mask=(xs >= lo) & (xs < hi), other=0.0).to(tl.float32)


@triton.jit
def _segment_norm(x, xs, lo, hi, w, eps, dt: tl.constexpr):
    """RMSNorm of x[lo:hi] (a slice of the x_proj row), in place in a full-width vector; 0 elsewhere. w: the
    norm weights at their places (_segment_w), dt the model dtype."""
    inside = (xs >= lo) & (xs < hi)
    xm = tl.where(inside, x, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xm * xm, axis=0) / (hi - lo) + eps)
    return tl.where(inside, ((xm * rstd).to(dt).to(tl.float32) * w).to(dt).to(tl.float32), 0.0)


@triton.jit
def _dt_proj_rows(wdt_ptr, ds, dmask, xs, R):
    """W_dt (Di, R) rows ds as a (BD, BX) fp32 tile, 0 past column R."""
    return tl.load(wdt_ptr + ds[:, None] * R + xs[None, :], mask=dmask[:, None] & (xs[None, :] < R),
                   other=0.0).to(tl.float32)


@triton.jit
def mamba_ssm_kernel(
    xpart_ptr, u_ptr, z_ptr, wdt_ptr, dtb_ptr, alog_ptr, dsk_ptr, dtn_ptr, bn_ptr, cn_ptr, eps,
    state_ptr, y_ptr, wo_ptr, bo_ptr, h_ptr, a_ptr, ho_ptr, ao_ptr, B, Di, R, N, NP, H, fold_ptr, lg_ptr, X, S,
    BD: tl.constexpr, BX: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr, OUT: tl.constexpr,
    HAS_BO: tl.constexpr, ACC: tl.constexpr, BH: tl.constexpr, PACK: tl.constexpr, FOLD: tl.constexpr,
    BXP: tl.constexpr, HS: tl.constexpr,
):
    """Grid (cdiv(Di, BD), B): x_proj row b = sum of the NP partials, rounded to the model dtype; RMSNorms
    of its dt (R), B and C (N) parts; dt for BD channels = dt_proj(dt) (rounded), + bias, softplus; the
    state (B, Di, N) fp32 advanced in place; y = (C . state + D u) * silu(z) -> y (B, Di).
    OUT (one row): instead of storing y, the out_proj (H, Di) split over the channel blocks: each program adds
    its channels' share (+ the bias, program 0) to ao (_down_split, from wo = out_proj transposed (Di, H); its
    first block read before the wait), and with ACC program 0 writes h + a, the residual that output goes on,
    to ho. Without OUT the arguments from wo_ptr to ao_ptr are not read.
    FOLD (with OUT): the next MoE router's logits before its norm's row scale, by linearity. The layer's output
    goes onto the residual as h + out_proj(y) (+ bias), and the router reads RMSNorm of that: its logits are
    rstd * (Wr nw) (h + bias) + rstd * ((Wr nw) Wout) y, rstd the norm's row scale. fold (X, Di + H) fp32 holds
    (Wr nw) Wout in columns [0, Di) and Wr nw in [Di, Di + H): each program adds its channels' share of the
    second term and its slice of S hidden units' share of the first (read before the wait) into lg (BXP, zeroed
    before the step) by atomic adds; ffn_up and down_residual read it, so no router kernel runs."""
    pd = tl.program_id(0)
    b = tl.program_id(1)
    dt = u_ptr.dtype.element_ty
    NX = R + 2 * N
    xs = tl.arange(0, BX)
    ds = pd * BD + tl.arange(0, BD)
    dmask = ds < Di
    ns = tl.arange(0, BN)
    nmask = ns < N
    m2 = dmask[:, None] & nmask[None, :]
    # the weights of these channels first: A, D, the dt bias, the dt/B/C norm weights (one vector: their
    # columns of the x_proj row), and under PDL W_dt (Di, R) rows ds (against the normalised dt, which sits in
    # x_proj columns [0, R))
    if PDL:
        wdt = _dt_proj_rows(wdt_ptr, ds, dmask, xs, R)
    nwx = _segment_w(dtn_ptr, xs, 0, R) + _segment_w(bn_ptr, xs, R, R + N) + _segment_w(cn_ptr, xs, R + N, NX)
    A = -tl.exp(tl.load(alog_ptr + ds[:, None] * N + ns[None, :], mask=m2, other=0.0).to(tl.float32))
    dskip = tl.load(dsk_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    dtbias = tl.load(dtb_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + b * Di * N + ds[:, None] * N + ns[None, :]
    h = tl.load(s_ptrs, mask=m2, other=0.0, cache_modifier=".cg")  # the state (last written a token ago)
    if OUT:
        wo0 = _split_w(wo_ptr, Di, pd * BD, H, 0, BH, BD, PACK)
    if FOLD:  # this program's columns of the folded router and its hidden slice's share (h is final two kernels back)
        es = tl.arange(0, BXP)
        emask = es < X
        fmt = tl.load(fold_ptr + es[:, None] * (Di + H) + ds[None, :], mask=emask[:, None] & dmask[None, :], other=0.0)
        js = pd * S + tl.arange(0, HS)
        jmask = (tl.arange(0, HS) < S) & (js < H)
        fr = tl.load(fold_ptr + es[:, None] * (Di + H) + Di + js[None, :], mask=emask[:, None] & jmask[None, :],
                     other=0.0)
        hx = tl.load(h_ptr + js, mask=jmask, other=0.0, cache_modifier=".cg")
        if ACC:
            hx = _pending_add(hx, a_ptr + js, jmask)
        hx = hx.to(tl.float32)
        if HAS_BO:
            hx += tl.load(bo_ptr + js, mask=jmask, other=0.0).to(tl.float32)
        lg = tl.sum(fr * hx[None, :], axis=1)  # (BXP,)
    _after_previous_kernel(PDL)
    # u and z issued with the partials below, their latencies overlapping
    u = tl.load(u_ptr + b * Di + ds, mask=dmask, other=0.0).to(tl.float32)
    zz = tl.load(z_ptr + b * Di + ds, mask=dmask, other=0.0).to(tl.float32)
    xrow = tl.zeros((BX,), tl.float32)
    for p0 in range(0, NP, BP):  # BP partials at a time
        ps = p0 + tl.arange(0, BP)
        parts = tl.load(xpart_ptr + ps[:, None] * B * NX + b * NX + xs[None, :],
                        mask=(ps[:, None] < NP) & (xs[None, :] < NX), other=0.0)
        xrow += tl.sum(parts, axis=0)
    xrow = xrow.to(dt).to(tl.float32)  # x_proj output (NX,) in the model dtype
    dtn = _segment_norm(xrow, xs, 0, R, nwx, eps, dt)
    bn = _segment_norm(xrow, xs, R, R + N, nwx, eps, dt)
    cn = _segment_norm(xrow, xs, R + N, NX, nwx, eps, dt)
    if not PDL:  # (the same load late: fewer registers held for the dot form's wider channel blocks)
        wdt = _dt_proj_rows(wdt_ptr, ds, dmask, xs, R)
    delta = tl.sum(wdt * dtn[None, :], axis=1).to(dt).to(tl.float32) + dtbias  # dtn is 0 past column R
    delta = _softplus(delta)
    bvec = tl.sum(tl.where(xs[None, :] == (R + ns)[:, None], bn[None, :], 0.0), axis=1)  # (BN,)
    cvec = tl.sum(tl.where(xs[None, :] == (R + N + ns)[:, None], cn[None, :], 0.0), axis=1)
    h = tl.exp2(delta[:, None] * A * LOG2E) * h + (delta * u)[:, None] * bvec[None, :]
    tl.store(s_ptrs, h, mask=m2)
    y = tl.sum(h * cvec[None, :], axis=1) + u * dskip
    y = y * zz * tl.sigmoid(zz)
    if OUT:
        yo = tl.where(dmask, y.to(dt).to(tl.float32), 0.0)
        _down_split(wo0, wo_ptr, Di, pd * BD, yo[None, :], 1.0, ao_ptr, H, BH, BD, PACK)
        if FOLD:
            lg += tl.sum(fmt * yo[None, :], axis=1)
            tl.atomic_add(lg_ptr + es, lg, mask=emask, sem="relaxed")
        if pd == 0:
            if HAS_BO:
                for h0 in range(0, H, BH):
                    hs = h0 + tl.arange(0, BH)
                    tl.atomic_add(ao_ptr + hs, tl.load(bo_ptr + hs, mask=hs < H, other=0.0).to(tl.float32),
                                  mask=hs < H, sem="relaxed")
            if ACC:
                _materialize(h_ptr, a_ptr, ho_ptr, H, BH)
    else:
        tl.store(y_ptr + b * Di + ds, y.to(dt), mask=dmask)


@triton.jit
def router_kernel(h_ptr, s_hb, a_ptr, nw_ptr, eps, wr_ptr, wsel_ptr, B, H, X,
                  TOPK: tl.constexpr, BXP: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr, ACC: tl.constexpr):
    """Grid (B,): row b's MoE routing. Softmax over the X router logits of RMSNorm(h[b]), the top-k kept
    without renormalisation (lowest expert index first on ties); wsel[e, b] = that weight, rounded to the
    model dtype as the eager router's, or 0 where e is not among the top k."""
    b = tl.program_id(0)
    dt = h_ptr.dtype.element_ty
    xs = tl.arange(0, BXP)
    w0 = _w_tile(wr_ptr, H, 0, X, 0, H, BXP, BK)
    _after_previous_kernel(PDL)
    logits = _matmul(h_ptr + b * s_hb, s_hb, nw_ptr, eps, w0, wr_ptr, H, 0, X, 1, H, 1, BXP, BK, True, True, False,
                     a_ptr + b * s_hb, ACC)
    logits = tl.sum(logits, axis=0).to(dt).to(tl.float32)  # (1, BXP) -> (BXP,)
    tl.store(wsel_ptr + xs * B + b, _top_k(logits, X, TOPK, BXP, dt), mask=xs < X)


@triton.jit
def _top_k(logits, X, TOPK: tl.constexpr, BXP: tl.constexpr, dt: tl.constexpr):
    """Router logits (BXP,) fp32 (valid below X) -> the softmax weights of the top-k experts, rounded to the
    model dtype as the eager router's (lowest expert index first on ties), 0 for the others."""
    xs = tl.arange(0, BXP)
    work = tl.where(xs < X, _softmax(logits, X, BXP), -1.0)
    wsel = tl.zeros((BXP,), tl.float32)
    for _ in tl.static_range(TOPK):
        best = tl.max(work, axis=0)
        j = tl.min(tl.where(work == best, xs, BXP), axis=0)
        wsel = tl.where(xs == j, best, wsel)
        work = tl.where(xs == j, -1.0, work)
    return wsel.to(dt).to(tl.float32)


@triton.jit
def _softmax(logits, X, BXP: tl.constexpr):
    """Softmax (BXP,) fp32 of router logits over the X experts (past X: 0)."""
    xs = tl.arange(0, BXP)
    logits = tl.where(xs < X, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    return p / tl.sum(p, axis=0)


@triton.jit
def _slot_hits(picked, BXP: tl.constexpr, SP: tl.constexpr):
    """Which expert (BXP,) fills which slot (SP,) of a one-row routing: (SP, BXP), the picked experts (int32 0/1) in
    increasing index order, one per slot."""
    return (picked[None, :] != 0) & ((tl.cumsum(picked, axis=0) - 1)[None, :] == tl.arange(0, SP)[:, None])


@triton.jit
def _picked_experts(wsel_ptr, X, BXP: tl.constexpr, SP: tl.constexpr):
    """The experts a one-row batch picked: wsel (X, 1) from router_kernel -> their indices in increasing
    order (SP,), their routing weights (SP,) and which of the SP slots hold one (SP >= top-k; a weight that
    rounded to 0 picks nothing, as in the loop over experts). Read once per program (_load_once)."""
    return _pick(_load_once(wsel_ptr, X, BXP), BXP, SP)


@triton.jit
def _pick(w, BXP: tl.constexpr, SP: tl.constexpr):
    """Routing weights w (BXP,) of one row -> the picked experts (nonzero weights) in increasing index order
    (SP,), their weights (SP,), and which slots hold one."""
    xs = tl.arange(0, BXP)
    hit = _slot_hits((w != 0.0).to(tl.int32), BXP, SP)
    es = tl.sum(tl.where(hit, xs[None, :], 0), axis=1)
    ws = tl.sum(tl.where(hit, w[None, :], 0.0), axis=1)
    return es, ws, tl.sum(hit.to(tl.int32), axis=1) != 0


@triton.jit
def _load_once(ptr, n, BXP: tl.constexpr):
    """ptr[:n] as (BXP,) fp32 (0 past n), read past L1 (".cg", see the module docstring) by the lanes of one row of a
    (32, BXP) tile and passed to every thread by the tile's sum over its rows (exact: the other rows are 0). A
    kernel's hundreds of programs then ask L2 for the line once each instead of once per warp: every request for
    one line is served by one L2 slice, so a line that every warp of a kernel reads holds the kernel up (with 16
    rows of router logits read by every warp of a MoE ffn_up's 352 programs of 8 warps, each program took twice as
    long; the picked experts read once per program: ~10 us less per jamba-1b token, KERNEL_NOTES.md version 17)."""
    rows = tl.arange(0, 32)
    xs = tl.arange(0, BXP)
    tile = tl.load(ptr + rows[:, None] * 0 + xs[None, :], mask=(rows[:, None] == 0) & (xs[None, :] < n), other=0.0,
                   cache_modifier=".cg")
    return tl.sum(tile.to(tl.float32), axis=0)


@triton.jit
def _top_slots(logits, X, TOPK: tl.constexpr, BXP: tl.constexpr, SP: tl.constexpr):
    """The top-k experts of router logits (BXP,) (valid below X; lowest expert index first on ties) -> their
    indices in increasing order (SP,) and which of the SP slots hold one. Comparisons only: the same logits
    give the same experts in every kernel."""
    xs = tl.arange(0, BXP)
    lg = tl.where(xs < X, logits, float("-inf"))
    ahead = (lg[None, :] > lg[:, None]) | ((lg[None, :] == lg[:, None]) & (xs[None, :] < xs[:, None]))
    hit = _slot_hits(((tl.sum(ahead.to(tl.int32), axis=1) < TOPK) & (xs < X)).to(tl.int32), BXP, SP)
    return tl.sum(tl.where(hit, xs[None, :], 0), axis=1), tl.sum(hit.to(tl.int32), axis=1) != 0


@triton.jit
def _folded_probs(logits, rstd, X, BXP: tl.constexpr, dt: tl.constexpr):
    """A folded router's softmax (BXP,) over the X experts (0 past X) from its logits before the row scale (from
    mamba_ssm_kernel, FOLD) and the norm's row scale rstd: router_kernel's roundings (the scaled logits and each
    weight rounded to the dtype, _top_k)."""
    xs = tl.arange(0, BXP)
    return tl.where(xs < X, _softmax((logits * rstd).to(dt).to(tl.float32), X, BXP).to(dt).to(tl.float32), 0.0)


@triton.jit
def _gate_up(h_ptr, s_hb, nw_ptr, eps, wg0, wu0, wg_ptr, wu_ptr, f0, F, B, H, BB: tl.constexpr, BF: tl.constexpr,
             BK: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr, a_ptr=None, ACC: tl.constexpr = False,
             PACK: tl.constexpr = False):
    """(BB, BF) fp32 = silu(gate x) * up x, and the norm's row scale (a scalar with PACK, else (BB, 1)), for gate/up
    rows [f0, f0 + BF) (row-major (F, H) weights whose first tiles wg0, wu0 the caller loaded) and x = RMSNorm(h)
    (+ a, see _x_tile): gate and up in one pass over H, the norm as in _matmul, rounded where the eager layers
    round. PACK: as in _matmul."""
    dt = h_ptr.dtype.element_ty
    if PACK:
        xl, xh, ss = _x_halves(h_ptr, nw_ptr, 0, H, BK // 2, True, a_ptr, ACC)
        g = _mm_halves(xl, xh, wg0)
        up = _mm_halves(xl, xh, wu0)
        for k0 in range(BK, H, BK):
            xl, xh, s = _x_halves(h_ptr, nw_ptr, k0, H, BK // 2, True, a_ptr, ACC)
            ss += s
            g += _mm_halves(xl, xh, _w_tile(wg_ptr, H, f0, F, k0, H, BF, BK, True))
            up += _mm_halves(xl, xh, _w_tile(wu_ptr, H, f0, F, k0, H, BF, BK, True))
        rstd = 1.0 / tl.sqrt(ss / H + eps)
    else:
        x, ss = _x_tile(h_ptr, s_hb, nw_ptr, B, 0, H, BB, BK, True, a_ptr, ACC)
        g = _mm(x, wg0, IEEE, DOT)
        up = _mm(x, wu0, IEEE, DOT)
        for k0 in range(BK, H, BK):
            x, s = _x_tile(h_ptr, s_hb, nw_ptr, B, k0, H, BB, BK, True, a_ptr, ACC)
            ss += s
            g += _mm(x, _w_tile(wg_ptr, H, f0, F, k0, H, BF, BK), IEEE, DOT)
            up += _mm(x, _w_tile(wu_ptr, H, f0, F, k0, H, BF, BK), IEEE, DOT)
        rstd = (1.0 / tl.sqrt(ss / H + eps))[:, None]
    g = (g * rstd).to(dt).to(tl.float32)
    return (g * tl.sigmoid(g)).to(dt).to(tl.float32) * (up * rstd).to(dt).to(tl.float32), rstd


@triton.jit
def ffn_up_kernel(
    h_ptr, s_hb, a_ptr, nw_ptr, eps, wg_ptr, wu_ptr, s_we, act_ptr, wsel_ptr, B, H, F, X, lg_ptr,
    ROUTED: tl.constexpr, SP: tl.constexpr, BXP: tl.constexpr, BB: tl.constexpr, BF: tl.constexpr,
    BK: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr, NRB: tl.constexpr,
    ACC: tl.constexpr, PACK: tl.constexpr, FOLD: tl.constexpr, TOPK: tl.constexpr,
):
    """Grid (cdiv(F, BF) * NRB, X), or (cdiv(F, BF), top-k) with SP > 0 (one row: program_id(1) is a slot of
    _picked_experts). Expert e of a MoE (ROUTED: rows with wsel[e, b] != 0, from router_kernel) or the
    dense MLP (X = 1, every row): act[e, b, f-block] = silu(gate_e x) * up_e x with x = RMSNorm(h). An
    expert no row picked reads no weights (so a MoE's weights wait for the routing). PACK: see _matmul.
    FOLD (one row, a router folded into the mamba_ssm before, see mamba_ssm_kernel): the slot's expert is the top-k
    of its logits at lg (_top_slots), and program (0, 0) writes the routing weights to wsel for down_residual
    (_folded_probs with the norm's row scale of _gate_up)."""
    pf, r0 = _row_block(tl.program_id(0), NRB, BB)
    h_ptr += r0 * s_hb
    a_ptr += r0 * s_hb
    act_ptr += r0 * F
    wsel_ptr += r0
    rows = tl.arange(0, BB)
    rmask = rows < B - r0
    dt = h_ptr.dtype.element_ty
    f0 = pf * BF
    if ROUTED:
        _after_previous_kernel(PDL)
        if FOLD:  # one line, read by every warp: faster here than _load_once's exchange through shared memory
            xs = tl.arange(0, BXP)
            logits = tl.load(lg_ptr + xs, mask=xs < X, other=0.0, cache_modifier=".cg")
            es, valid = _top_slots(logits, X, TOPK, BXP, SP)
        elif SP > 0:
            es, _, valid = _picked_experts(wsel_ptr, X, BXP, SP)
        if SP > 0:
            here = tl.arange(0, SP) == tl.program_id(1)
            e = tl.sum(tl.where(here, es, 0), axis=0)
            go = tl.sum(tl.where(here & valid, 1, 0), axis=0) != 0
        else:
            e = tl.program_id(1)
            go = tl.max(tl.abs(tl.load(wsel_ptr + e * B + rows, mask=rmask, other=0.0)), axis=0) != 0.0
    else:
        # always true, so every program reaches its wait below; the PDL chain needs every program of every
        # kernel to wait before it reads or writes activations
        e = 0
        go = B > 0
    if go:
        wg0 = _w_tile(wg_ptr + e * s_we, H, f0, F, 0, H, BF, BK, PACK)
        wu0 = _w_tile(wu_ptr + e * s_we, H, f0, F, 0, H, BF, BK, PACK)
        if not ROUTED:
            _after_previous_kernel(PDL)
        a, rstd = _gate_up(h_ptr, s_hb, nw_ptr, eps, wg0, wu0, wg_ptr + e * s_we, wu_ptr + e * s_we, f0, F, B - r0,
                           H, BB, BF, BK, IEEE, DOT, a_ptr, ACC, PACK)
        if FOLD:
            if (pf == 0) & (tl.program_id(1) == 0):  # the routing weights, for down_residual
                chosen = tl.sum(tl.where(valid[:, None] & (es[:, None] == xs[None, :]), 1, 0), axis=0) != 0
                one = tl.max(tl.max(rstd + tl.zeros((1, 1), tl.float32), axis=1), axis=0)  # one row: a scalar
                p = _folded_probs(logits, one, X, BXP, dt)
                tl.store(wsel_ptr + xs, tl.where(chosen, p, 0.0), mask=xs < X)
        fs = f0 + tl.arange(0, BF)
        tl.store(act_ptr + e * B * F + rows[:, None] * F + fs[None, :], a.to(dt),
                 mask=rmask[:, None] & (fs[None, :] < F))


@triton.jit
def _slots_w(wd_ptr, s_we, es, valid, hs, hmask, f0, F, BF: tl.constexpr, PACK: tl.constexpr = False):
    """Down weight tile (SP, BH, BF) of the picked experts es (one row; 0 in empty slots); PACK: (SP, BH, BF // 2)
    int32 words, as _w_tile."""
    if PACK:
        fs = f0 // 2 + tl.arange(0, BF // 2)
        fw = tl.multiple_of(F // 2, 8)
        offs = es[:, None, None] * tl.multiple_of(s_we // 2, 8) + hs[None, :, None] * fw + fs[None, None, :]
        m = valid[:, None, None] & hmask[None, :, None] & (fs < fw)[None, None, :]
        return tl.load(_words(wd_ptr) + offs, mask=m, other=0)
    else:
        fs = f0 + tl.arange(0, BF)
        return tl.load(wd_ptr + es[:, None, None] * s_we + hs[None, :, None] * F + fs[None, None, :],
                       mask=valid[:, None, None] & hmask[None, :, None] & (fs < F)[None, None, :], other=0.0)


@triton.jit
def _slots_mm(act_ptr, es, valid, w, f0, F, BF: tl.constexpr, PACK: tl.constexpr = False):
    """The picked experts' activations act[es, 0, f0:f0+BF] times their weight tile w, summed -> (SP, BH) fp32
    (PACK: w from _slots_w(PACK), the activations read as words too)."""
    if PACK:
        fs = f0 // 2 + tl.arange(0, BF // 2)
        fw = tl.multiple_of(F // 2, 8)
        m = valid[:, None] & (fs < fw)[None, :]
        al, ah = _halves(tl.load(_words(act_ptr) + es[:, None] * fw + fs[None, :], mask=m, other=0))
        wl, wh = _halves(w)
        return tl.sum(wl * al[:, None, :] + wh * ah[:, None, :], axis=2)
    else:
        fs = f0 + tl.arange(0, BF)
        a = tl.load(act_ptr + es[:, None] * F + fs[None, :], mask=valid[:, None] & (fs < F)[None, :], other=0.0)
        return tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32), axis=2)


@triton.jit
def down_residual_kernel(
    act_ptr, wd_ptr, s_we, bias_ptr, wsel_ptr, h_ptr, s_hb, a_ptr, B, H, F, X, lg_ptr,
    ROUTED: tl.constexpr, SP: tl.constexpr, BXP: tl.constexpr, HAS_BIAS: tl.constexpr, BB: tl.constexpr,
    BH: tl.constexpr, BF: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr,
    NRB: tl.constexpr, ACC: tl.constexpr, PACK: tl.constexpr, FOLD: tl.constexpr, TOPK: tl.constexpr,
):
    """Grid (cdiv(H, BH) * NRB,): h[:, block] += the layer output, in place, rounded as the eager layers round.

    ROUTED (MoE): out = sum over the experts some row picked (in expert order, each term rounded) of
    wsel[e] * down_e(act[e]), act (X, B, F), down weights (X, H, F); with SP > 0 (one row) the picked
    experts' first weight tiles are read before the wait (the routing is two kernels back), otherwise
    after it, expert by expert. Otherwise one linear layer: out = act @ W^T (+ bias) with act (B, F),
    W (H, F): the MLP's down projection, Mamba's out_proj, attention's o_proj; its first tile is read
    before the wait. The residual h is read before the wait too (written two or more kernels back), with ACC
    the pending output a of a split layer further back added to it (see _x_tile). PACK (one row): the weights as
    int32 words (_w_tile, _slots_w). FOLD (one row, a router folded into the mamba_ssm two kernels back): the
    experts are the top-k of its logits at lg, before the wait (_top_slots on the bits ffn_up read, so the same
    experts), their weights from wsel after it (written by ffn_up)."""
    hb, r0 = _row_block(tl.program_id(0), NRB, BB)
    h_ptr += r0 * s_hb
    a_ptr += r0 * s_hb
    act_ptr += r0 * F  # act (B, F) or (X, B, F)
    wsel_ptr += r0
    h0 = hb * BH
    hs = h0 + tl.arange(0, BH)
    hmask = hs < H
    rows = tl.arange(0, BB)
    rmask = rows < B - r0
    dt = h_ptr.dtype.element_ty
    m2 = rmask[:, None] & hmask[None, :]
    hp = h_ptr + rows[:, None] * s_hb + hs[None, :]
    hv = tl.load(hp, mask=m2, other=0.0, cache_modifier=".cg")
    if ACC:
        hv = _pending_add(hv, a_ptr + rows[:, None] * s_hb + hs[None, :], m2)
    hv = hv.to(tl.float32)
    out = tl.zeros((BB, BH), tl.float32)
    if ROUTED:
        if FOLD:
            es, valid = _top_slots(_load_once(lg_ptr, X, BXP), X, TOPK, BXP, SP)
        elif SP > 0:
            es, ws, valid = _picked_experts(wsel_ptr, X, BXP, SP)
        if SP > 0:
            es = es.to(tl.int64)
            w0 = _slots_w(wd_ptr, s_we, es, valid, hs, hmask, 0, F, BF, PACK)
            _after_previous_kernel(PDL)
            if FOLD:
                xs = tl.arange(0, BXP)
                ws = tl.sum(tl.where(valid[:, None] & (es[:, None] == xs[None, :]),
                                     _load_once(wsel_ptr, X, BXP)[None, :], 0.0), axis=1)
            acc = _slots_mm(act_ptr, es, valid, w0, 0, F, BF, PACK)
            for f0 in range(BF, F, BF):
                w = _slots_w(wd_ptr, s_we, es, valid, hs, hmask, f0, F, BF, PACK)
                acc += _slots_mm(act_ptr, es, valid, w, f0, F, BF, PACK)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + hs, mask=hmask, other=0.0).to(tl.float32)[None, :]
            y = (acc.to(dt).to(tl.float32) * ws[:, None]).to(dt).to(tl.float32)  # (SP, BH), 0 in empty slots
            slots = tl.arange(0, SP)
            acc1 = tl.zeros((BH,), tl.float32)
            for k in tl.static_range(SP):
                acc1 = (acc1 + tl.sum(tl.where(slots[:, None] == k, y, 0.0), axis=0)).to(dt).to(tl.float32)
            out += acc1[None, :]
        else:
            _after_previous_kernel(PDL)
            for e in range(X):
                w = tl.load(wsel_ptr + e * B + rows, mask=rmask, other=0.0)
                if tl.max(tl.abs(w), axis=0) != 0.0:
                    wd = wd_ptr + e * s_we
                    acc = _matmul(act_ptr + e * B * F, F, act_ptr, 0.0, _w_tile(wd, F, h0, H, 0, F, BH, BF), wd, F, h0,
                                  H, B - r0, F, BB, BH, BF, False, IEEE, DOT)
                    if HAS_BIAS:
                        acc += tl.load(bias_ptr + hs, mask=hmask, other=0.0).to(tl.float32)[None, :]
                    y = (acc.to(dt).to(tl.float32) * w[:, None]).to(dt).to(tl.float32)
                    out = (out + y).to(dt).to(tl.float32)
    else:
        w0 = _w_tile(wd_ptr, F, h0, H, 0, F, BH, BF, PACK)
        _after_previous_kernel(PDL)
        out = _matmul(act_ptr, F, act_ptr, 0.0, w0, wd_ptr, F, h0, H, B - r0, F, BB, BH, BF, False, IEEE, DOT,
                      act_ptr, False, PACK)
        if HAS_BIAS:
            out += tl.load(bias_ptr + hs, mask=hmask, other=0.0).to(tl.float32)[None, :]
        out = out.to(dt).to(tl.float32)
    tl.store(hp, (hv + out).to(dt), mask=m2)


@triton.jit
def _materialize(h_ptr, a_ptr, ho_ptr, H, BH: tl.constexpr):
    """ho = h + the pending output a (rounded as in _x_tile): the residual stream a split layer's own output
    goes onto, written for the kernels after it (which read ho and that layer's accumulator)."""
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        m = hs < H
        tl.store(ho_ptr + hs, _pending_add(tl.load(h_ptr + hs, mask=m, other=0.0), a_ptr + hs, m), mask=m)


@triton.jit
def _split_w(wt_ptr, K, k0, H, h0, BH: tl.constexpr, BK: tl.constexpr, PACK: tl.constexpr = False):
    """The block W[h0:h0+BH, k0:k0+BK] of a linear layer's weight W (H, K), read from its transpose (K, H) as
    (BK, BH): BK whole rows of it, where W's own rows would give BK-element pieces of H rows. PACK: as
    (BK, BH // 2) int32 words (_w_tile)."""
    return _w_tile(wt_ptr, H, k0, K, h0, H, BK, BH, PACK)


@triton.jit
def _down_split(w0, wt_ptr, K, k0, x, scale, ao_ptr, H, BH: tl.constexpr, BK: tl.constexpr,
                PACK: tl.constexpr = False):
    """ao[:H] += scale * W[:, k0:k0+BK] @ x, by fp32 atomic adds: this program's share of a linear layer whose
    reduction is split over the programs (x (1, BK) fp32, 0 past K; W (H, K) read from its transpose; the first
    block w0 = _split_w(..., h0=0, ...) loaded by the caller, PACK as there)."""
    _split_add(w0, x, scale, ao_ptr, 0, H, BH, PACK)
    for h0 in range(BH, H, BH):
        _split_add(_split_w(wt_ptr, K, k0, H, h0, BH, BK, PACK), x, scale, ao_ptr, h0, H, BH, PACK)


@triton.jit
def _split_add(w, x, scale, ao_ptr, h0, H, BH: tl.constexpr, PACK: tl.constexpr = False):
    """ao[h0:h0+BH] += scale * (x @ w) for a block w (BK, BH) from _split_w and x (1, BK) fp32. PACK: w is
    (BK, BH // 2) words; the even and odd outputs are summed in the tile's own layout, then interleaved."""
    hs = h0 + tl.arange(0, BH)
    if PACK:
        wl, wh = _halves(w)
        xc = tl.sum(x, axis=0)[:, None]  # (BK, 1)
        out = tl.reshape(tl.join(tl.sum(wl * xc, axis=0), tl.sum(wh * xc, axis=0)), (BH,))
    else:
        out = tl.sum(tl.sum(x[:, :, None] * w.to(tl.float32)[None, :, :], axis=1), axis=0)
    tl.atomic_add(ao_ptr + hs, out * scale, mask=hs < H, sem="relaxed")


@triton.jit
def _swiglu_down(h_ptr, a_ptr, nw_ptr, eps, wg0, wu0, wd0, wg_ptr, wu_ptr, wd_ptr, f0, F, H, scale, ao_ptr,
                 BF: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """One row's F block of an MLP: act = silu(gate x) * up x (_gate_up), then its share of the down projection
    (H, F), times scale, added to ao (_down_split)."""
    act, _ = _gate_up(h_ptr, H, nw_ptr, eps, wg0, wu0, wg_ptr, wu_ptr, f0, F, 1, H, 1, BF, BK, IEEE, False, a_ptr,
                      ACC)
    _down_split(wd0, wd_ptr, F, f0, act, scale, ao_ptr, H, BH, BF)


@triton.jit
def ffn_split_kernel(
    h_ptr, a_ptr, ho_ptr, ao_ptr, nw_ptr, eps, wr_ptr, wg_ptr, wu_ptr, s_we, wd_ptr, s_wde, H, F, X,
    ACC: tl.constexpr, ROUTED: tl.constexpr, TOPK: tl.constexpr, BXP: tl.constexpr, SP: tl.constexpr,
    BF: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (cdiv(F, BF), top-k or 1), one row: a whole MLP or MoE layer in one kernel, its down projection
    split over the programs' F blocks (wd: the down weight transposed, (F, H), or the experts' (X, F, H)).
    x = RMSNorm(h (+ a, ACC)); MoE (ROUTED): every program computes the row's routing (router logits from the
    router weight it read before the wait, softmax, top-k) and takes the expert of its slot; then act = silu(gate
    x) * up x for its F block and ao += w_e * down[:, F block] @ act (_down_split). ao, zeroed before the step,
    holds the layer's output until the kernels after it add it to the residual (_x_tile); with ACC, program
    (0, 0) writes that residual, h + a, to ho. The dense MLP's weights are read before the wait, the experts'
    after the routing."""
    pf = tl.program_id(0)
    slot = tl.program_id(1)
    f0 = pf * BF
    dt = h_ptr.dtype.element_ty
    if ROUTED:
        wr0 = _w_tile(wr_ptr, H, 0, X, 0, H, BXP, BK)
        _after_previous_kernel(PDL)
        logits = _matmul(h_ptr, H, nw_ptr, eps, wr0, wr_ptr, H, 0, X, 1, H, 1, BXP, BK, True, True, False, a_ptr,
                         ACC)
        es, ws, valid = _pick(_top_k(tl.sum(logits, axis=0).to(dt).to(tl.float32), X, TOPK, BXP, dt), BXP, SP)
        here = tl.arange(0, SP) == slot
        e = tl.sum(tl.where(here, es, 0), axis=0).to(tl.int64)
        if tl.sum(tl.where(here & valid, 1, 0), axis=0) != 0:
            wg, wu, wd = wg_ptr + e * s_we, wu_ptr + e * s_we, wd_ptr + e * s_wde
            _swiglu_down(h_ptr, a_ptr, nw_ptr, eps, _w_tile(wg, H, f0, F, 0, H, BF, BK),
                         _w_tile(wu, H, f0, F, 0, H, BF, BK), _split_w(wd, F, f0, H, 0, BH, BF), wg, wu, wd, f0, F, H,
                         tl.sum(tl.where(here, ws, 0.0), axis=0), ao_ptr, BF, BK, BH, IEEE, ACC)
    else:
        wg0 = _w_tile(wg_ptr, H, f0, F, 0, H, BF, BK)
        wu0 = _w_tile(wu_ptr, H, f0, F, 0, H, BF, BK)
        wd0 = _split_w(wd_ptr, F, f0, H, 0, BH, BF)
        _after_previous_kernel(PDL)
        _swiglu_down(h_ptr, a_ptr, nw_ptr, eps, wg0, wu0, wd0, wg_ptr, wu_ptr, wd_ptr, f0, F, H, 1.0, ao_ptr, BF, BK,
                     BH, IEEE, ACC)
    if ACC:
        if (pf == 0) & (slot == 0):
            _materialize(h_ptr, a_ptr, ho_ptr, H, BH)


@triton.jit
def attn_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, acc_ptr, ml_ptr, scale, HKV, G, HD, NS, L,
    s_kb, s_kh, s_mb, BG: tl.constexpr, BHD: tl.constexpr, BL: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid (B * Hkv, NS): split `sp` of the keys of one KV head for the G query heads that share it. The
    filled positions [0, pos] (pos read on the device; never past the cache's L positions) are cut into NS
    splits of the same whole number of BL-blocks, so every split has work however much of the cache is
    filled; this program takes positions [sp * s_len, (sp + 1) * s_len) of them. Online softmax; writes
    the unnormalised output (G, hd) and (max, sum) per head."""
    _after_previous_kernel(PDL)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)  # b * s_kb passes 2^31 for large caches
    hk = (bh % HKV).to(tl.int64)
    pos = tl.load(pos_ptr).to(tl.int32)
    gs = tl.arange(0, BG)
    ds = tl.arange(0, BHD)
    gmask = gs < G
    dmask = ds < HD
    qv = tl.load(q_ptr + b * (HKV * G * HD) + (hk * G + gs[:, None]) * HD + ds[None, :],
                 mask=gmask[:, None] & dmask[None, :], other=0.0)
    dt = qv.dtype
    m = tl.full((BG,), float("-inf"), tl.float32)
    lsum = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, BHD), tl.float32)
    filled = tl.minimum(pos + 1, L)
    s_len = tl.cdiv(tl.cdiv(filled, NS), BL) * BL
    start = sp * s_len
    end = tl.minimum(start + s_len, filled)
    kbase = k_ptr + b * s_kb + hk * s_kh
    vbase = v_ptr + b * s_kb + hk * s_kh
    for l0 in range(start, end, BL):
        ls = l0 + tl.arange(0, BL)
        lm = ls < end
        valid = lm & (tl.load(mask_ptr + b * s_mb + ls, mask=lm, other=0) != 0)
        kt = tl.load(kbase + ls[:, None] * HD + ds[None, :], mask=lm[:, None] & dmask[None, :], other=0.0)
        s = _dot(qv, tl.trans(kt), IEEE) * scale  # (BG, BL)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        vt = tl.load(vbase + ls[:, None] * HD + ds[None, :], mask=lm[:, None] & dmask[None, :], other=0.0)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(dt), vt, IEEE)
        m = m_new
    base = (bh * NS + sp) * BG
    tl.store(acc_ptr + (base + gs[:, None]) * BHD + ds[None, :], acc)
    tl.store(ml_ptr + (base + gs) * 2, m)
    tl.store(ml_ptr + (base + gs) * 2 + 1, lsum)


@triton.jit
def attn_combine_kernel(acc_ptr, ml_ptr, out_ptr, HKV, G, HD, NS,
                        BG: tl.constexpr, BHD: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr):
    """Grid (B * Hkv, G): merge the NS splits' partial softmaxes of one query head -> out (B, Hq * hd)."""
    _after_previous_kernel(PDL)
    bh = tl.program_id(0)
    g = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    ss = tl.arange(0, BS)
    ds = tl.arange(0, BHD)
    smask = ss < NS
    row = (bh * NS + ss) * BG + g  # (BS,) partial rows of this head
    m = tl.load(ml_ptr + row * 2, mask=smask, other=float("-inf"))
    lsum = tl.load(ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.max(m, axis=0)))
    a = tl.load(acc_ptr + row[:, None] * BHD + ds[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(w[:, None] * a, axis=0) / tl.sum(w * lsum, axis=0)
    tl.store(out_ptr + b * (HKV * G * HD) + (hk * G + g) * HD + ds, out.to(out_ptr.dtype.element_ty), mask=ds < HD)


@triton.jit
def _logit_block(row, start, vs, V):
    """Logits row[start + vs] as fp32, -inf past V and where a logit is NaN (a NaN is never the greedy token)."""
    x = tl.load(row + start + vs, mask=start + vs < V, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def _first_max(x0, x1, x2, x3, v0, BV: tl.constexpr, best, idx):
    """The running (largest value, its first index) of a row after its four blocks x0..x3 of BV values from index
    v0: an elementwise pass over the blocks first (each lane's largest value and the first block holding it),
    then one max and one min across the program, where four argmaxes would take eight reductions."""
    m = x0
    blk = tl.zeros([BV], tl.int32)
    take = x1 > m
    m, blk = tl.where(take, x1, m), tl.where(take, 1, blk)
    take = x2 > m
    m, blk = tl.where(take, x2, m), tl.where(take, 2, blk)
    take = x3 > m
    m, blk = tl.where(take, x3, m), tl.where(take, 3, blk)
    top = tl.max(m, axis=0)
    first = tl.min(tl.where(m == top, blk * BV + tl.arange(0, BV), 4 * BV), axis=0)
    take = top > best  # a tie keeps the earlier index
    return tl.where(take, top, best), tl.where(take, v0 + first, idx)


@triton.jit
def next_token_kernel(logits_ptr, s_lb, V, emb_ptr, h_ptr, s_hb, H, tok_ptr, s_tb, pos_ptr, z_ptr, NZ, B,
                      BV: tl.constexpr, BH: tl.constexpr, BZ: tl.constexpr, PDL: tl.constexpr):
    """Greedy decoding inside the step's chain of kernels, so that the next step follows with no other launch
    between. Programs b < B: the next token of row b is the first index of its largest logit (torch.argmax's
    choice on the same values, except that NaN logits are passed over where argmax would pick the first NaN),
    written to tok[b], and that token's embedding row to h[b], the next step's input; program 0 moves the
    position on by one. Programs past B zero BZ elements each of the split layers' accumulators (NZ in all) for
    the next step. The row's logits are read in blocks of 4 BV, the four loads issued before the first is reduced
    (_first_max)."""
    _after_previous_kernel(PDL)
    pid = tl.program_id(0)
    if pid < B:
        row = logits_ptr + pid.to(tl.int64) * s_lb
        best = tl.full((), float("-inf"), tl.float32)
        idx = tl.zeros((), tl.int32)
        vs = tl.arange(0, BV)
        for v0 in range(0, V, 4 * BV):
            best, idx = _first_max(_logit_block(row, v0, vs, V), _logit_block(row, v0 + BV, vs, V),
                                   _logit_block(row, v0 + 2 * BV, vs, V), _logit_block(row, v0 + 3 * BV, vs, V),
                                   v0, BV, best, idx)
        tl.store(tok_ptr + pid * s_tb, idx.to(tl.int64))
        hs = tl.arange(0, BH)
        src = emb_ptr + idx.to(tl.int64) * H
        for k0 in range(0, H, BH):
            tl.store(h_ptr + pid * s_hb + k0 + hs, tl.load(src + k0 + hs, mask=k0 + hs < H), mask=k0 + hs < H)
        if pid == 0:
            tl.store(pos_ptr, tl.load(pos_ptr, cache_modifier=".cg") + 1)
    else:
        zs = (pid - B) * BZ + tl.arange(0, BZ)
        tl.store(z_ptr + zs, tl.zeros((BZ,), tl.float32), mask=zs < NZ)
