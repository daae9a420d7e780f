"""Cross-entropy of next-token logits as two Triton kernels; same contract as `cross_entropy_ref`.

    logits: (T, V) fp32 / bf16 / fp16, any row stride      targets: (T,) integer, ignore_index marks a skipped row
    returns the fp32 mean over the n non-ignored rows of  loss_r = lse_r - x[r, t_r],  lse_r = log sum_v exp x[r, v]

Forward: one program per row streams the row in BLOCK_V tiles and keeps its log-sum-exp online in fp32.
With m the running max and s = sum exp(x - m) over the tiles seen so far, a tile whose max lifts m to m'
rescales the sum, s <- s * exp(m - m') + sum_tile exp(x - m'); at the end lse = m + log s. The program
writes the row's loss and lse (fp32, T values each); the mean is their sum over n, the count of rows whose
target is not ignore_index (0 / 0 = nan when every row is ignored, as in PyTorch).
Backward: d mean / d x[r, v] = (softmax(x_r)_v - [v == t_r]) * g / n = (exp(x[r, v] - lse_r) - [v == t_r]) * g / n
for the incoming gradient g: one more pass that reads each row once and writes its gradient once, in the
logits' dtype. Ignored rows get zeros without being read. Nothing of size T x V is made besides the gradient:
the saved tensors are the logits themselves, the targets, lse and n. A target outside [0, V) that is not
ignore_index gives a nan loss (the check that raises an error would need a host sync on CUDA; off CUDA the
input check raises it first). Rows are read at their own stride; logits whose last dim is not contiguous
are copied first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selective_scan import _interp_compat  # noqa: F401  (CPU interpreter only)
from .reference import check_inputs

# vocabulary tile instead of the default below (tests set small tiles to cover several tiles and a masked tail)
BLOCK_V_OVERRIDE: int | None = None


@triton.jit
def _ce_fwd_kernel(x_ptr, t_ptr, loss_ptr, lse_ptr, V, s_x, s_t, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row * s_t).to(tl.int64)
    valid = t != ignore_index
    x_row = x_ptr + row * s_x
    offs = tl.arange(0, BLOCK_V)
    n_read = tl.where(valid, V, 0)  # ignored rows are not read
    # the running max starts below every finite fp32 logit, not at -inf: a first tile of -inf logits (a masked
    # slice of the vocabulary) then leaves s = 0 instead of s = 0 * exp(-inf - -inf) = nan
    m = tl.full([], -3.0e38, tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(tl.where(valid, s, 1.0))
    in_vocab = (t >= 0) & (t < V)
    x_t = tl.load(x_row + tl.where(in_vocab, t, 0)).to(tl.float32)
    loss = tl.where(in_vocab, lse - x_t, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))


@triton.jit
def _ce_bwd_kernel(x_ptr, t_ptr, lse_ptr, g_ptr, n_ptr, dx_ptr, V, s_x, s_t, s_dx, ignore_index,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row * s_t).to(tl.int64)
    valid = t != ignore_index
    scale = tl.load(g_ptr).to(tl.float32) / tl.load(n_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    x_row = x_ptr + row * s_x
    dx_row = dx_ptr + row * s_dx
    offs = tl.arange(0, BLOCK_V)
    n_read = tl.where(valid, V, 0)  # ignored rows are not read, only written (zeros)
    t_col = tl.where(valid & (t >= 0) & (t < V), t, -1).to(tl.int32)  # the column that gets the -1
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        d = (tl.exp(x - lse) - tl.where(cols == t_col, 1.0, 0.0)) * scale
        tl.store(dx_row + cols, tl.where(valid, d, 0.0).to(dx_ptr.dtype.element_ty), mask=cols < V)


def _config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096-wide tiles over 8 warps (16 logits per thread) for real vocabularies."""
    bv = BLOCK_V_OVERRIDE if BLOCK_V_OVERRIDE is not None else min(4096, max(triton.next_power_of_2(V), 16))
    return bv, min(8, max(1, bv // 512))


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        T, V = logits.shape
        loss = torch.empty(T, device=logits.device, dtype=torch.float32)
        lse = torch.empty(T, device=logits.device, dtype=torch.float32)
        if T:
            bv, warps = _config(V)
            _ce_fwd_kernel[(T,)](logits, targets, loss, lse, V, logits.stride(0), targets.stride(0), ignore_index,
                                 BLOCK_V=bv, num_warps=warps)
        n = (targets != ignore_index).sum()  # stays on the device: no host sync
        ctx.save_for_backward(logits, targets, lse, n)
        ctx.ignore_index = ignore_index
        return loss.sum() / n

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, n = ctx.saved_tensors
        T, V = logits.shape
        dx = torch.empty(T, V, device=logits.device, dtype=logits.dtype)
        if T:
            bv, warps = _config(V)
            _ce_bwd_kernel[(T,)](logits, targets, lse, grad, n, dx, V, logits.stride(0), targets.stride(0),
                                 dx.stride(0), ctx.ignore_index, BLOCK_V=bv, num_warps=warps)
        return dx, None, None


def cross_entropy_triton(logits, targets, ignore_index: int = -100):
    """The mean fp32 cross-entropy over the non-ignored rows, like `cross_entropy_ref`; differentiable in
    logits, whose gradient comes back in the logits' dtype."""
    check_inputs(logits, targets, ignore_index)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if targets.dtype not in (torch.int64, torch.int32):
        targets = targets.long()
    return _CrossEntropyFn.apply(logits, targets, int(ignore_index))
