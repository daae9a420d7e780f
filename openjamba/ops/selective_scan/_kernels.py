"""Triton kernels of the selective scan (see triton.py for the autograd wrapper and the maths).

Decomposition: one program owns BLOCK_D channels x all N states of one batch row and walks the
sequence in blocks of BLOCK_T time steps. Each block is loaded as coalesced (BLOCK_T, BLOCK_D) tiles of
the channel-last inputs; the recurrence inside a block is an associative scan over the time axis of a
(BLOCK_T, BLOCK_N, BLOCK_D) register tile, and only the (BLOCK_N, BLOCK_D) state is carried between
blocks. The channel axis is last on purpose: Triton spreads the fastest axis over the lanes of a warp,
so time and (most of) the states stay inside each thread: the scan over time and the contraction over
states run without shuffles, and the per-(t, d) work (softplus, gate) is not repeated for every state.
Nothing of size (B, L, D, N) ever reaches memory: the forward saves the state every SAVE_T steps
(1/SAVE_T of it) for the backward, which recomputes everything else block by block, in reverse.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a1, b1) is applied first: h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _rows(x, offs_t, src):
    """Row t of the result is row src[t] of x (a (BLOCK_T, BN, BD) tile; rows out of range give -0).
    The time axis lies inside each thread, so the selection folds to register renaming."""
    pick = offs_t[None, :, None, None] == src[:, None, None, None]
    return tl.sum(tl.where(pick, x[None, :, :, :], -0.0), axis=1)


@triton.jit
def _softplus(x):
    # log(1 + e^x); below -12 log(1 + e) ~ e to fp32 precision, and log(1 + e) would lose e's low bits
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.where(x < -12.0, e, tl.log(1.0 + e)))


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x; FAST uses the flush-to-zero hardware instruction (no denormal fix-up: decays < 2^-126 are 0)."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _fetch(p_u, p_dl, p_z, p_B, p_C, rows, offs_d, offs_n, mask_d, mask_n, L,
           s_ul, s_dl, s_zl, s_Bl, s_Cl, HAS_Z: tl.constexpr):
    """Raw (storage-dtype) tiles of one block. Issued one block ahead of their use, so the loads of
    block i + 1 are in flight while block i computes (occupancy is low: the tiles take many registers)."""
    mt = (rows >= 0) & (rows < L)
    m2 = mt[:, None] & mask_d[None, :]
    mtn = mt[:, None] & mask_n[None, :]
    u = tl.load(p_u + rows[:, None] * s_ul + offs_d[None, :], mask=m2, other=0.0)
    dl = tl.load(p_dl + rows[:, None] * s_dl + offs_d[None, :], mask=m2, other=0.0)
    z = u
    if HAS_Z:
        z = tl.load(p_z + rows[:, None] * s_zl + offs_d[None, :], mask=m2, other=0.0)
    Bt = tl.load(p_B + rows[:, None] * s_Bl + offs_n[None, :], mask=mtn, other=0.0)
    Ct = tl.load(p_C + rows[:, None] * s_Cl + offs_n[None, :], mask=mtn, other=0.0)
    return u, dl, z, Bt, Ct


@triton.jit
def _delta_act(raw, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta after bias/softplus, 0 outside the mask; pre-activation)."""
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _channel_params(A_ptr, bias_ptr, Dsk_ptr, offs_d, mask_d, nd_offs, mask_nd, HAS_BIAS: tl.constexpr,
                    HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of channels' A (BN, BD), delta bias and D skip (BD,), all fp32 (zeros when absent)."""
    A = tl.load(A_ptr + nd_offs, mask=mask_nd, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dsk_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return A, bias, Dv


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dsk_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, pre_ptr, hlast_ptr, hsave_ptr, hchunk_ptr, dsum_ptr,
    L, D, n_blocks, n_save, chunk_blocks,
    s_ub, s_ul, s_db, s_dl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, s_yb, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr, SAVE_T: tl.constexpr, SAVE_PRE: tl.constexpr, FAST: tl.constexpr,
    PASS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, N: tl.constexpr,
):
    """PASS 0: the whole sequence in one program per (channel block, batch row).
    When that grid is too small to fill the GPU the sequence is also split into chunks of chunk_blocks
    blocks (grid axis 2): PASS 1 scans each chunk from a zero state and writes its end state and its
    delta sum (the chunk's decay is exp(A * sum delta)); the caller chains the chunks' start states;
    PASS 2 rescans each chunk from its true start state and writes y (and the saved states)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    n_chunks = tl.num_programs(2)
    i0 = c * chunk_blocks
    i1 = tl.minimum(i0 + chunk_blocks, n_blocks)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < D
    mask_n = offs_n < N  # constant-folded away when N == BLOCK_N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    nd_offs = offs_n[:, None] + offs_d[None, :] * N  # (BN, BD) into (D, N)-shaped tensors
    save_offs = offs_n[:, None] * D + offs_d[None, :]  # (BN, BD) into the (N, D) saved states

    A, bias, Dv = _channel_params(A_ptr, bias_ptr, Dsk_ptr, offs_d, mask_d, nd_offs, mask_nd, HAS_BIAS, HAS_D,
                                  BLOCK_D)
    A2 = A * LOG2E
    state_base = b * D * N
    h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    chunk_offs = (b * n_chunks + c) * N * D + save_offs
    if PASS == 2:
        h = tl.load(hchunk_ptr + chunk_offs, mask=mask_nd, other=0.0)
    elif PASS == 0 and HAS_H0:
        h = tl.load(h0_ptr + state_base + nd_offs, mask=mask_nd, other=0.0)
    dsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_u, p_dl, p_z, p_B, p_C = u_ptr + b * s_ub, delta_ptr + b * s_db, z_ptr + b * s_zb, B_ptr + b * s_Bb, C_ptr + b * s_Cb
    nxt = _fetch(p_u, p_dl, p_z, p_B, p_C, i0 * BLOCK_T + offs_t, offs_d, offs_n, mask_d, mask_n, L,
                 s_ul, s_dl, s_zl, s_Bl, s_Cl, HAS_Z)
    for i in range(i0, i1):
        if SAVE:  # the state every SAVE_T steps (a divisor of BLOCK_T), where the backward restarts
            tl.store(hsave_ptr + (b * n_save + i * (BLOCK_T // SAVE_T)) * N * D + save_offs, h, mask=mask_nd)
        cu, cdl, cz, cB, cC = nxt
        nxt = _fetch(p_u, p_dl, p_z, p_B, p_C, (i + 1) * BLOCK_T + offs_t, offs_d, offs_n, mask_d, mask_n, L,
                     s_ul, s_dl, s_zl, s_Bl, s_Cl, HAS_Z)
        rows = i * BLOCK_T + offs_t
        m2 = (rows < L)[:, None] & mask_d[None, :]
        u = cu.to(tl.float32)
        dt, _ = _delta_act(cdl, m2, bias, HAS_BIAS, SOFTPLUS)
        Bt = cB.to(tl.float32)
        Ct = cC.to(tl.float32)

        dA = _exp2(dt[:, None, :] * A2[None, :, :], FAST)  # (BT, BN, BD)
        dBu = (dt * u)[:, None, :] * Bt[:, :, None]
        # the carried state folded into the first row: only the scan's second output is needed
        dBu = tl.where(offs_t[:, None, None] == 0, dBu + dA * h[None, :, :], dBu)
        _, H = tl.associative_scan((dA, dBu), 0, _affine_combine)
        if SAVE:
            for k in tl.static_range(1, BLOCK_T // SAVE_T):
                idx = i * (BLOCK_T // SAVE_T) + k
                hk = tl.sum(tl.where(offs_t[:, None, None] == k * SAVE_T - 1, H, 0.0), axis=0)
                if idx < n_save:
                    tl.store(hsave_ptr + (b * n_save + idx) * N * D + save_offs, hk, mask=mask_nd)
        # padded rows carry the state unchanged, so the last row is the state after the block
        h = tl.sum(tl.where(offs_t[:, None, None] == BLOCK_T - 1, H, 0.0), axis=0)
        if PASS == 1:
            dsum += tl.sum(dt, axis=0)
        else:
            ys = tl.sum(H * Ct[:, :, None], axis=1)  # (BT, BD)
            out = ys + Dv[None, :] * u
            if SAVE_PRE:  # the output before the gate, for the backward's dz (saves recomputing C . h)
                tl.store(pre_ptr + b * s_yb + rows[:, None] * s_yl + offs_d[None, :], out, mask=m2)
            if HAS_Z:
                zz = cz.to(tl.float32)
                out = out * zz * tl.sigmoid(zz)
            tl.store(y_ptr + b * s_yb + rows[:, None] * s_yl + offs_d[None, :], out, mask=m2)
    if PASS == 1:
        tl.store(hchunk_ptr + chunk_offs, h, mask=mask_nd)
        tl.store(dsum_ptr + (b * n_chunks + c) * D + offs_d, dsum, mask=mask_d)
    else:
        if c == n_chunks - 1:
            tl.store(hlast_ptr + state_base + nd_offs, h, mask=mask_nd)


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dsk_ptr, z_ptr, bias_ptr, hsave_ptr, dy_ptr, dhlast_ptr, pre_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dBp_ptr, dCp_ptr, dDp_ptr, dbiasp_ptr, dh0_ptr,
    L, D, n_blocks,
    s_ub, s_ul, s_db, s_dl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, s_gb, s_gl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHLAST: tl.constexpr, HAS_PRE: tl.constexpr, FAST: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, N: tl.constexpr,
):
    """Reverse walk over blocks. With carry = the gradient reaching a block from later steps:
    dh_t = C_t * dys_t + exp(delta_{t+1} A) dh_{t+1}  (a reverse affine scan inside the block);
    the decay-path gradient uses h_{t-1} * exp(delta_t A) = h_t - dBu_t, so no shifted state is needed.
    Gradients reduced over channels (dB, dC) are added atomically into one fp32 buffer (ATOMIC) or
    written per program and summed by the caller."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_pd = tl.num_programs(0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    nd_offs = offs_n[:, None] + offs_d[None, :] * N
    save_offs = offs_n[:, None] * D + offs_d[None, :]

    A, bias, Dv = _channel_params(A_ptr, bias_ptr, Dsk_ptr, offs_d, mask_d, nd_offs, mask_nd, HAS_BIAS, HAS_D,
                                  BLOCK_D)  # A: (BN, BD)
    A2 = A * LOG2E
    state_base = b * D * N
    carry = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # exp(delta_{e+1} A) dh_{e+1}, e = block end
    if HAS_DHLAST:
        carry = tl.load(dhlast_ptr + state_base + nd_offs, mask=mask_nd, other=0.0)
    dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_u, p_dl, p_z, p_B, p_C = u_ptr + b * s_ub, delta_ptr + b * s_db, z_ptr + b * s_zb, B_ptr + b * s_Bb, C_ptr + b * s_Cb
    p_g = dy_ptr + b * s_gb
    # prefetch of the last block (the walk goes backwards); dy and the saved state too
    r0 = (n_blocks - 1) * BLOCK_T + offs_t
    nxt = _fetch(p_u, p_dl, p_z, p_B, p_C, r0, offs_d, offs_n, mask_d, mask_n, L, s_ul, s_dl, s_zl, s_Bl, s_Cl, HAS_Z)
    m_nx = (r0 < L)[:, None] & mask_d[None, :]
    n_g = tl.load(p_g + r0[:, None] * s_gl + offs_d[None, :], mask=m_nx, other=0.0)
    p_pre = pre_ptr + b * s_gb
    n_pre = n_g
    if HAS_PRE:
        n_pre = tl.load(p_pre + r0[:, None] * s_gl + offs_d[None, :], mask=m_nx, other=0.0)
    n_h0 = tl.load(hsave_ptr + (b * n_blocks + n_blocks - 1) * N * D + save_offs, mask=mask_nd, other=0.0)
    for j in range(0, n_blocks):
        i = n_blocks - 1 - j
        cu, cdl, cz, cB, cC = nxt
        c_g, h0, c_pre = n_g, n_h0, n_pre
        rp = (i - 1) * BLOCK_T + offs_t  # rows of the previous block (negative: masked off)
        nxt = _fetch(p_u, p_dl, p_z, p_B, p_C, rp, offs_d, offs_n, mask_d, mask_n, L, s_ul, s_dl, s_zl, s_Bl, s_Cl, HAS_Z)
        m_p = ((rp >= 0) & (rp < L))[:, None] & mask_d[None, :]
        n_g = tl.load(p_g + rp[:, None] * s_gl + offs_d[None, :], mask=m_p, other=0.0)
        if HAS_PRE:
            n_pre = tl.load(p_pre + rp[:, None] * s_gl + offs_d[None, :], mask=m_p, other=0.0)
        n_h0 = tl.load(hsave_ptr + (b * n_blocks + tl.maximum(i - 1, 0)) * N * D + save_offs, mask=mask_nd, other=0.0)

        rows = i * BLOCK_T + offs_t
        mask_t = rows < L
        m2 = mask_t[:, None] & mask_d[None, :]
        mtn = mask_t[:, None] & mask_n[None, :]
        x_offs = rows[:, None] * s_ul + offs_d[None, :]
        u = cu.to(tl.float32)
        dt, raw = _delta_act(cdl, m2, bias, HAS_BIAS, SOFTPLUS)
        Bt = cB.to(tl.float32)
        Ct = cC.to(tl.float32)
        g = c_g.to(tl.float32)

        # forward recompute of the block from its saved start state (folded into the first row, so the
        # scan's cumulative decays are never needed: only its second output is used)
        dA = _exp2(dt[:, None, :] * A2[None, :, :], FAST)  # (BT, BN, BD)
        dBu = (dt * u)[:, None, :] * Bt[:, :, None]
        first = offs_t[:, None, None] == 0
        _, H = tl.associative_scan((dA, tl.where(first, dBu + dA * h0[None, :, :], dBu)), 0, _affine_combine)

        # output gate and skip
        dys = g
        if HAS_Z:
            zz = cz.to(tl.float32)
            sz = tl.sigmoid(zz)
            if HAS_PRE:
                pre = c_pre.to(tl.float32)
            else:
                pre = tl.sum(H * Ct[:, :, None], axis=1) + Dv[None, :] * u
            dz = g * pre * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_ptr + b * s_gb + x_offs, dz, mask=m2)
            dys = g * zz * sz
        if HAS_D:
            dD_acc += tl.sum(dys * u, axis=0)

        # reverse scan for dh inside the block, the carry from the next block folded into the last row,
        # run as a forward scan over the rows in reverse order. alpha_t = exp(delta_{t+1} A) is dA one
        # row up (1 on the block's last row); reversed, it is dA one row down.
        gh = dys[:, None, :] * Ct[:, :, None]
        gh = tl.where(offs_t[:, None, None] == BLOCK_T - 1, gh + carry[None, :, :], gh)
        r_alpha = tl.where(first, 1.0, _rows(dA, offs_t, BLOCK_T - offs_t))  # row t: dA[BT - t] (t >= 1)
        _, r_dH = tl.associative_scan((r_alpha, _rows(gh, offs_t, BLOCK_T - 1 - offs_t)), 0, _affine_combine)
        dH = _rows(r_dH, offs_t, BLOCK_T - 1 - offs_t)
        # gradient leaving the block towards step t0 - 1: exp(delta_t0 A) dh_t0
        carry = tl.sum(tl.where(offs_t[:, None, None] == 0, dA * dH, 0.0), axis=0)

        dec = dH * (H - dBu)  # dh_t * exp(delta_t A) h_{t-1}
        dA_acc += tl.sum(dec * dt[:, None, :], axis=0)
        dHB = tl.sum(dH * Bt[:, :, None], axis=1)  # (BT, BD)
        ddt = tl.sum(dec * A[None, :, :], axis=1) + dHB * u
        du = dHB * dt + Dv[None, :] * dys
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=0)
        tl.store(du_ptr + b * s_gb + x_offs, du, mask=m2)
        tl.store(ddelta_ptr + b * s_gb + x_offs, ddt, mask=m2)
        dBt = tl.sum(dH * (dt * u)[:, None, :], axis=2)  # (BT, BN)
        dCt = tl.sum(H * dys[:, None, :], axis=2)
        if ATOMIC:  # summed over the channel programs in place (order-dependent rounding)
            part = (b * L + rows[:, None]) * N + offs_n[None, :]
            tl.atomic_add(dBp_ptr + part, dBt, mask=mtn, sem="relaxed")
            tl.atomic_add(dCp_ptr + part, dCt, mask=mtn, sem="relaxed")
        else:  # one slice per channel program, summed by the caller (deterministic)
            part = ((b * n_pd + pid_d) * L + rows[:, None]) * N + offs_n[None, :]
            tl.store(dBp_ptr + part, dBt, mask=mtn)
            tl.store(dCp_ptr + part, dCt, mask=mtn)
    tl.store(dA_ptr + state_base + nd_offs, dA_acc, mask=mask_nd)
    tl.store(dh0_ptr + state_base + nd_offs, carry, mask=mask_nd)
    if HAS_D:
        tl.store(dDp_ptr + b * D + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbiasp_ptr + b * D + offs_d, dbias_acc, mask=mask_d)
