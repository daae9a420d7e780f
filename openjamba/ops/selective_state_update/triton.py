"""One-token selective state update (decoding) as a Triton kernel; same contract as the reference.

    state: (B, D, N) fp32, updated in place (its last dim must be contiguous)
    u, delta, z: (B, D)      A: (D, N)      B, C: (B, N)      D_skip, delta_bias: (D,)
Returns y: (B, D) in u's dtype. Decoding reads the whole state once and writes it once, so the kernel
is a single fused pass over it (BLOCK_D channels x all N states per program), everything else is tiny.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selective_scan import _interp_compat  # noqa: F401  (CPU interpreter only)
from ..selective_scan._kernels import LOG2E, _softplus


@triton.jit
def _ssu_kernel(
    state_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dsk_ptr, z_ptr, bias_ptr, y_ptr,
    D, N, s_sb, s_sd, s_ub, s_db, s_zb, s_Bb, s_Cb, s_yb,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_n = offs_n < N
    m = mask_d[:, None] & mask_n[None, :]
    s_ptrs = state_ptr + b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :]
    h = tl.load(s_ptrs, mask=m, other=0.0)
    u = tl.load(u_ptr + b * s_ub + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + b * s_db + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_Bb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * LOG2E) * h + (dt * u)[:, None] * Bv[None, :]
    tl.store(s_ptrs, h, mask=m)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += u * tl.load(Dsk_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + b * s_zb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(y_ptr + b * s_yb + offs_d, y, mask=mask_d)


def selective_state_update_triton(state, u, delta, A, B, C, D_skip=None, z=None, delta_bias=None,
                                  delta_softplus=True):
    """Advance `state` by one token in place and return y (B, D); see the module docstring."""
    if state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError("selective_state_update_triton needs an fp32 state with a contiguous last dim")
    batch, D, N = state.shape
    u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    A = A.contiguous()
    y = torch.empty(batch, D, device=u.device, dtype=u.dtype)
    BN = max(triton.next_power_of_2(N), 2)
    BD = max(2, min(triton.next_power_of_2(D), max(4096 // BN, 2), 64))
    zz = z if z is not None else u
    dummy = y
    _ssu_kernel[(triton.cdiv(D, BD), batch)](
        state, u, delta, A, B, C, D_skip if D_skip is not None else dummy, zz,
        delta_bias if delta_bias is not None else dummy, y,
        D, N, state.stride(0), state.stride(1), u.stride(0), delta.stride(0), zz.stride(0),
        B.stride(0), C.stride(0), y.stride(0),
        HAS_D=D_skip is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), BLOCK_D=BD, BLOCK_N=BN, num_warps=4,
    )
    return y
