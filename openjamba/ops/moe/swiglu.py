"""The experts' gated activation, silu(gate) * up, over the (rows, [gate | up]) output of the first
grouped matmul, as one Triton kernel forward and one backward.

    swiglu(gate_up: (P, 2F)) -> (P, F)        gate = gate_up[:, :F], up = gate_up[:, F:]

Backward, with s = sigmoid(gate) and dy the gradient of the output:
    d gate = dy * up * s * (1 + gate * (1 - s))      d up = dy * gate * s
both written into one (P, 2F) tensor in gate_up's layout, which is what the grouped matmul's backward
takes. Arithmetic in fp32, results in the input dtype. Each element is read and written once: for
jamba-1b's experts (P ~ 33K rows, F 2816, bf16) the backward moves 0.9 GB. The same expression compiled
by torch.compile concatenated the two halves in a separate pass; see benchmarks/KERNEL_NOTES.md.
On tensors that are not on CUDA (and outside the Triton interpreter) the plain PyTorch expression runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _interpreting

BLOCK_R = 1  # rows per program
BLOCK_C = 1024  # columns of each half per program
NUM_WARPS = 4
# (1, 1024, 4 warps) was the fastest of 8 tiles swept on an H200 at jamba-1b's size (P 32888, F 2816, bf16):
# forward 138 us, forward + backward 362 us; the others 366-419 us

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch expression below still runs
    triton = None


if triton is not None:
    @triton.jit
    def _gate_up_tile(gu_ptr, P, F, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's (BLOCK_R, BLOCK_C) tile: rows, columns, mask, offsets into gate_up, gate and up
        in fp32."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        mask = (rows < P) & (cols < F)
        base = rows.to(tl.int64) * (2 * F) + cols
        g = tl.load(gu_ptr + base, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + base + F, mask=mask, other=0.0).to(tl.float32)
        return rows, cols, mask, base, g, u

    @triton.jit
    def _swiglu_fwd_kernel(gu_ptr, y_ptr, P, F, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, cols, mask, base, g, u = _gate_up_tile(gu_ptr, P, F, BLOCK_R, BLOCK_C)
        y = g * tl.sigmoid(g) * u
        tl.store(y_ptr + rows.to(tl.int64) * F + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(gu_ptr, dy_ptr, dgu_ptr, P, F, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, cols, mask, base, g, u = _gate_up_tile(gu_ptr, P, F, BLOCK_R, BLOCK_C)
        dy = tl.load(dy_ptr + rows.to(tl.int64) * F + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        du = dy * g * s
        tl.store(dgu_ptr + base, dg.to(dgu_ptr.dtype.element_ty), mask=mask)
        tl.store(dgu_ptr + base + F, du.to(dgu_ptr.dtype.element_ty), mask=mask)


def _grid(P: int, F: int):
    return (triton.cdiv(P, BLOCK_R), triton.cdiv(F, BLOCK_C))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate_up = gate_up.contiguous()
        P, F2 = gate_up.shape
        y = gate_up.new_empty(P, F2 // 2)
        _swiglu_fwd_kernel[_grid(P, F2 // 2)](gate_up, y, P, F2 // 2, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                               num_warps=NUM_WARPS)
        ctx.save_for_backward(gate_up)
        return y

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        dy = dy.contiguous()
        P, F2 = gate_up.shape
        dgu = torch.empty_like(gate_up)
        _swiglu_bwd_kernel[_grid(P, F2 // 2)](gate_up, dy, dgu, P, F2 // 2, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                               num_warps=NUM_WARPS)
        return dgu


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# Whether CUDA tensors take the Triton kernels (False: the PyTorch expression, which torch.compile fuses
# itself; kept as a switch for side-by-side measurements)
USE_TRITON = True


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:] for a (P, 2F) tensor; see the module docstring."""
    if gate_up.ndim != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"swiglu: gate_up must be (rows, 2F); got {tuple(gate_up.shape)}")
    if triton is not None and USE_TRITON and (gate_up.is_cuda or _interpreting()):
        return _SwiGLU.apply(gate_up)
    return swiglu_ref(gate_up)
