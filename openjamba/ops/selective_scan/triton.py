"""Selective scan (Mamba-1) as fused Triton kernels: same signature and results as `selective_scan_ref`.

    u, delta, z: (B, L, D)     A: (D, N) fp32      B, C: (B, L, N)     D_skip, delta_bias: (D,)
    initial_state: (B, D, N) fp32 or None     returns y (B, L, D) in u.dtype, final_state (B, D, N) fp32

The forward fuses softplus(delta + bias), exp(delta * A), the recurrence, the C contraction, the D skip
and the silu(z) gate into one pass over the inputs. For training it also saves the fp32 state every
backward-BLOCK_T steps (4, or 8 on small grids: (B, L / 4, N, D) is a quarter of a (B, L, D, N) fp32
tensor) and, with a gate, the gate's input ys + D u (so the backward's dz needs no C . h), and the
backward recomputes each block from the saved state. Every input, the initial state included, gets
a gradient; dB and dC, sums over channels, are added atomically across channel programs (so their
last bits vary from run to run) unless torch's deterministic mode is on. Inputs may be fp32, bf16 or
fp16 with any strides whose last dimension is contiguous. Tile sizes are the fastest measured on an
H200 (benchmarks/KERNEL_NOTES.md).
"""

from __future__ import annotations

import os

import torch

from . import _interp_compat  # noqa: F401  (CPU interpreter only)
from ._kernels import scan_bwd_kernel, scan_fwd_kernel


# the hardware flush-to-zero exp2 (inline PTX) on GPUs; the interpreter runs plain tl.exp2
_FAST_EXP = os.environ.get("TRITON_INTERPRET") != "1"

# dB and dC (sums over channels) by atomic adds unless torch's deterministic mode is on
_ATOMIC_SUMS = True
# with a gate, the forward stores its input (ys + D u) for the backward instead of the backward
# recomputing C . h for dz: one (B, L, D) tensor more held for the backward
_SAVE_PRE = True

# (BLOCK_T, BLOCK_D, num_warps[, maxnreg]) of the forward and of the backward instead of the table
# below; the benchmark sweeps it. The backward BLOCK_T must divide the forward one: the forward saves
# the state every backward-BLOCK_T steps, where the backward restarts. maxnreg caps the registers per
# thread (more programs per SM, at the price of spills); None leaves the choice to the compiler.
CONFIG_OVERRIDE: tuple[tuple[int, ...], tuple[int, ...]] | None = None


def _config(N: int, D: int, backward: bool, batch: int = 1, device=None) -> tuple[int, int, int, int, int | None]:
    """(BLOCK_T, BLOCK_D, BLOCK_N, num_warps, maxnreg): the register tile is BLOCK_T x BLOCK_N x BLOCK_D
    fp32."""
    import triton

    BN = max(triton.next_power_of_2(N), 2)
    maxnreg = None
    if CONFIG_OVERRIDE is not None:
        bt, bd, warps, *rest = CONFIG_OVERRIDE[1 if backward else 0]
        maxnreg = rest[0] if rest else None
        bd = min(bd, max(triton.next_power_of_2(D), 2))
    else:
        # One warp per program where the tile allows it: the reductions over states then stay inside
        # the warp (no shared memory, no barriers). Per thread: 64 fp32 of each forward tile, 16-32 of
        # each backward tile (the backward keeps many tiles alive). Fastest on the H200 at N = 16:
        # forward (8, 16, 1 warp); backward (4, 16, 1 warp) where the grid has 4+ programs per SM,
        # else (8, 8, 1 warp) (benchmarks/KERNEL_NOTES.md).
        bt, per_warp = (4, 512) if backward else (8, 2048)
        if backward and device is not None and device.type == "cuda" and BN <= 16:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            per_warp = 1024
            if batch * triton.cdiv(D, 16) < 4 * sms:
                bt = 8
        bd = min(max(2, per_warp // (bt * BN)), max(triton.next_power_of_2(D), 2))
        warps = min(8, max(1, bt * BN * bd // per_warp))
    return bt, bd, BN, warps, maxnreg


def _launch_options(warps: int, maxnreg: int | None) -> dict:
    return {"num_warps": warps} if maxnreg is None else {"num_warps": warps, "maxnreg": maxnreg}


# number of sequence chunks to use instead of the heuristic (tests set it to cover the chunked path)
CHUNKS_OVERRIDE: int | None = None


def _n_chunks(programs: int, n_blocks: int, device) -> int:
    """Split the sequence only when (batch x channel blocks) programs leave most SMs idle.

    The split costs a second pass over the inputs; on the H200 it lost at every benchmark shape (256 and
    more programs), so it is kept for small grids only (e.g. one sequence of a narrow model)."""
    if CHUNKS_OVERRIDE is not None:
        return max(1, min(CHUNKS_OVERRIDE, n_blocks))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms // 2:
        return 1
    return max(1, min(triton_cdiv(2 * sms, programs), n_blocks // 8))


def _lastdim_contig(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D_skip, z, delta_bias, initial_state, delta_softplus):
        u, delta, B, C, z = (_lastdim_contig(t) for t in (u, delta, B, C, z))
        A = A.contiguous()
        batch, L, D = u.shape
        N = A.shape[1]
        BT, BD, BN, warps, maxnreg = _config(N, D, backward=False)
        save_t = _config(N, D, backward=True, batch=batch, device=u.device)[0]
        assert BT % save_t == 0, "the backward BLOCK_T must divide the forward one"
        n_blocks = triton_cdiv(L, BT)
        n_save = triton_cdiv(L, save_t)
        save = ctx.needs_input_grad[:9].count(True) > 0
        y = torch.empty(batch, L, D, device=u.device, dtype=u.dtype)
        # the gate's input (ys + D u), kept for the backward when there is a gate
        save_pre = _SAVE_PRE and save and z is not None
        pre = torch.empty(batch, L, D, device=u.device, dtype=u.dtype) if save_pre else None
        hlast = torch.empty(batch, D, N, device=u.device, dtype=torch.float32)
        hsave = torch.empty(batch, n_save if save else 1, N, D, device=u.device, dtype=torch.float32)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        dummy = hlast
        zz = z if z is not None else u
        n_pd = triton_cdiv(D, BD)
        n_chunks = _n_chunks(batch * n_pd, n_blocks, u.device)
        chunk_blocks = triton_cdiv(n_blocks, n_chunks)
        n_chunks = triton_cdiv(n_blocks, chunk_blocks)

        def launch(pass_, hchunk, dsum):
            scan_fwd_kernel[(n_pd, batch, n_chunks)](
                u, delta, A, B, C, D_skip if D_skip is not None else dummy, zz,
                delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
                y, pre if pre is not None else y, hlast, hsave, hchunk, dsum, L, D, n_blocks, n_save, chunk_blocks,
                u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
                B.stride(0), B.stride(1), C.stride(0), C.stride(1), y.stride(0), y.stride(1),
                HAS_D=D_skip is not None, HAS_Z=z is not None and pass_ != 1, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus), HAS_H0=h0 is not None, SAVE=save and pass_ != 1, SAVE_T=save_t,
                SAVE_PRE=save_pre and pass_ != 1,
                FAST=_FAST_EXP, PASS=pass_, BLOCK_T=BT, BLOCK_D=BD, BLOCK_N=BN, N=N, **_launch_options(warps, maxnreg),
            )

        if n_chunks == 1:
            launch(0, dummy, dummy)
        else:  # chunk-parallel: local scans, chain the chunk states (tiny), rescan with the true starts
            hend = torch.empty(batch, n_chunks, N, D, device=u.device, dtype=torch.float32)
            dsum = torch.empty(batch, n_chunks, D, device=u.device, dtype=torch.float32)
            launch(1, hend, dsum)
            decay = torch.exp(A.float().t()[None, None] * dsum[:, :, None, :])  # (B, chunks, N, D)
            hstart = torch.empty_like(hend)
            hstart[:, 0] = h0.transpose(1, 2) if h0 is not None else 0.0
            for c in range(1, n_chunks):
                hstart[:, c] = torch.addcmul(hend[:, c - 1], decay[:, c - 1], hstart[:, c - 1])
            launch(2, hstart, dsum)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D_skip, z, delta_bias, hsave, pre)
            ctx.softplus = bool(delta_softplus)
            ctx.save_t = save_t
            ctx.has_h0 = initial_state is not None
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return y, hlast

    @staticmethod
    def backward(ctx, dy, dhlast):
        u, delta, A, B, C, D_skip, z, delta_bias, hsave, pre = ctx.saved_tensors
        batch, L, D = u.shape
        N = A.shape[1]
        BT, BD, BN, warps, maxnreg = _config(N, D, backward=True, batch=batch, device=u.device)
        assert BT == ctx.save_t, "the backward restarts where the forward saved states: same BLOCK_T"
        n_pd = triton_cdiv(D, BD)
        dev = u.device
        dy = dy.contiguous() if dy is not None else torch.zeros_like(u)
        du = torch.empty(batch, L, D, device=dev, dtype=u.dtype)
        ddelta = torch.empty(batch, L, D, device=dev, dtype=delta.dtype)
        dz = torch.empty(batch, L, D, device=dev, dtype=z.dtype) if z is not None else du
        dA = torch.empty(batch, D, N, device=dev, dtype=torch.float32)
        # dB and dC sum over channels: atomic adds into one buffer, or (in deterministic mode) one slice
        # per channel program summed here, which is reproducible bit for bit but moves n_pd times the bytes
        atomic = _ATOMIC_SUMS and not torch.are_deterministic_algorithms_enabled()
        if atomic:
            dBp = torch.zeros(batch, L, N, device=dev, dtype=torch.float32)
            dCp = torch.zeros(batch, L, N, device=dev, dtype=torch.float32)
        else:
            dBp = torch.empty(batch, n_pd, L, N, device=dev, dtype=torch.float32)
            dCp = torch.empty(batch, n_pd, L, N, device=dev, dtype=torch.float32)
        dDp = torch.empty(batch, D, device=dev, dtype=torch.float32)
        dbiasp = torch.empty(batch, D, device=dev, dtype=torch.float32)
        dh0 = torch.empty(batch, D, N, device=dev, dtype=torch.float32)
        zz = z if z is not None else u
        dummy = dA
        scan_bwd_kernel[(n_pd, batch)](
            u, delta, A, B, C, D_skip if D_skip is not None else dummy, zz,
            delta_bias if delta_bias is not None else dummy, hsave, dy,
            dhlast.contiguous() if dhlast is not None else dummy, pre if pre is not None else dy,
            du, ddelta, dz, dA, dBp, dCp, dDp, dbiasp, dh0, L, D, triton_cdiv(L, BT),
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), du.stride(0), du.stride(1),
            HAS_D=D_skip is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus, HAS_DHLAST=dhlast is not None, HAS_PRE=pre is not None,
            FAST=_FAST_EXP, ATOMIC=atomic, BLOCK_T=BT, BLOCK_D=BD, BLOCK_N=BN, N=N,
            **_launch_options(warps, maxnreg),
        )
        dB = (dBp if atomic else dBp.sum(1)).to(B.dtype)
        dC = (dCp if atomic else dCp.sum(1)).to(C.dtype)
        dD = dDp.sum(0).to(D_skip.dtype) if D_skip is not None else None
        dbias = dbiasp.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
        dA = dA.sum(0).to(A.dtype)
        dh0 = dh0.to(ctx.h0_dtype) if ctx.has_h0 else None
        return du, ddelta, dA, dB, dC, dD, dz if z is not None else None, dbias, dh0, None


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def selective_scan_triton(u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=True,
                          initial_state=None):
    """Fused Triton selective scan; see the module docstring. Returns (y, final_state)."""
    batch, L, D = u.shape
    if L == 0:
        h = (initial_state.float().clone() if initial_state is not None
             else u.new_zeros(batch, D, A.shape[1], dtype=torch.float32))
        return u.new_zeros(batch, 0, D), h
    return _SelectiveScanFn.apply(u, delta, A, B, C, D_skip, z, delta_bias, initial_state, delta_softplus)
