"""AdamW with gradient-norm clipping folded in, for every tensor of a list in one Triton launch.

Same contract as `adamw_step_ref` (ops/adamw/reference.py). The tensors are reached through a device
table of their addresses, which must be 16-byte aligned so that whole blocks load and store 16 bytes at
a time (only a tensor's last partial block is masked). The work is cut into chunks of BLOCK x ITERS
elements (a chunk never spans two tensors) and each program streams one chunk: it reads the parameter,
gradient and both moments once and writes the parameter and moments once, 7 accesses per element
(torch's fused AdamW after clip_grad_norm_ makes 9: the clipping reads and rewrites every gradient).
The clip coefficient, the bias corrections and the found_inf guard are computed in every program from
one-element device tensors, so nothing is read back to the host and a skipped step moves no data. All tensors of one
launch share a dtype (parameters, gradients and moments alike); ClippedAdamW groups them so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per access block
ITERS = 8  # blocks per program: a chunk is BLOCK * ITERS elements
NUM_WARPS = 8
# (1024, 8, 8): 2.74 ms for jamba-1b's 789M bf16 parameters on an H200, 4.0 TB/s counting 7 accesses per
# element; torch's fused AdamW takes 4.11 ms and clip_grad_norm_ + fused AdamW 5.97 ms. Of the other
# settings swept (BLOCK 1024-4096, ITERS 4-8, 4 or 8 warps) the 1024-wide ones took 2.74-2.76 ms, the
# 2048- and 4096-wide ones 2.83-3.84 ms

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_kernel(ptrs, numels, chunk_tensor, chunk_index, norm_ptr, found_ptr, lr_ptr, n_tensors,
                  lr, weight_decay, beta1, beta2, eps, max_norm,
                  DTYPE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_FOUND: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_index + pid).to(tl.int64) * (BLOCK * ITERS)  # a multiple the compiler can see
    n = tl.load(numels + t)
    # ptrs rows: parameters, gradients, first moments, second moments, steps. The host checked that
    # the first four are 16-byte aligned; telling the compiler so lets it vectorise the accesses
    p_ptr = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(DTYPE)), 16)
    g_ptr = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(DTYPE)), 16)
    m_ptr = tl.multiple_of(tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(DTYPE)), 16)
    v_ptr = tl.multiple_of(tl.load(ptrs + 3 * n_tensors + t).to(tl.pointer_type(DTYPE)), 16)
    s_ptr = tl.load(ptrs + 4 * n_tensors + t).to(tl.pointer_type(tl.float32))
    if HAS_FOUND:  # a skipped step: every access masked off
        n = tl.where(tl.load(found_ptr) == 0, n, 0)
    coef = 1.0
    if HAS_NORM:
        coef = tl.minimum(max_norm / (tl.load(norm_ptr).to(tl.float32) + 1e-6), 1.0)
    if LR_ON_DEVICE:  # read at run time, so a captured CUDA graph follows the schedule
        lr = tl.load(lr_ptr).to(tl.float32)
    step = tl.load(s_ptr) + 1.0
    bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
    step_size = lr / bc1
    decay = 1.0 - lr * weight_decay
    for i in tl.static_range(ITERS):
        base = start + i * BLOCK
        if base + BLOCK <= n:  # a whole block: unmasked, so the accesses are vectorised
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, base, n, coef, decay, step_size, bc2_sqrt, beta1, beta2, eps,
                         DTYPE, BLOCK, False)
        elif base < n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, base, n, coef, decay, step_size, bc2_sqrt, beta1, beta2, eps,
                         DTYPE, BLOCK, True)


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, base, n, coef, decay, step_size, bc2_sqrt, beta1, beta2, eps,
                 DTYPE: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = base + tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs).to(tl.float32)
        p = tl.load(p_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs).to(tl.float32)
        v = tl.load(v_ptr + offs).to(tl.float32)
    g = g * coef
    p = p * decay
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    if MASKED:
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(DTYPE))
        tl.store(m_ptr + offs, m.to(DTYPE))
        tl.store(v_ptr + offs, v.to(DTYPE))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host table on the device without waiting for the GPU: through pinned memory, asynchronously
    (a plain copy would synchronise the stream, and the gradients' addresses change every step when they
    are set to None between steps)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Tables:
    """Device tables of one launch: the tensors' addresses, rebuilt whenever one moved (gradients set to
    None and recreated), and the chunk layout, rebuilt whenever a size changed. Both keys are checked, so
    memory reused by tensors of other sizes never meets stale chunk tables."""

    def __init__(self):
        self.ptr_key = self.size_key = None
        self.ptrs = self.numels = self.chunk_tensor = self.chunk_index = None

    def get(self, tensors: list[list[torch.Tensor]], device: torch.device):
        numels = [p.numel() for p in tensors[0]]
        if numels != self.size_key:
            chunks = [(i, c) for i, k in enumerate(numels) for c in range(triton.cdiv(k, BLOCK * ITERS))]
            self.numels = _to_device(torch.tensor(numels, dtype=torch.int64), device)
            self.chunk_tensor = _to_device(torch.tensor([c[0] for c in chunks], dtype=torch.int32), device)
            self.chunk_index = _to_device(torch.tensor([c[1] for c in chunks], dtype=torch.int32), device)
            self.size_key = numels
        ptrs = [t.data_ptr() for row in tensors for t in row]
        if ptrs != self.ptr_key:
            self.ptrs = _to_device(torch.tensor(ptrs, dtype=torch.int64), device)
            self.ptr_key = ptrs
        return self


def adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, steps, lr: float, weight_decay: float,
                      beta1: float, beta2: float, eps: float, grad_norm=None, max_norm: float = float("inf"),
                      found_inf=None, cache: dict | None = None) -> None:
    """See ops/adamw/reference.py. `cache` is a dict the caller keeps for this tensor list (ClippedAdamW
    keeps one per parameter group and dtype): the device tables of addresses live there between steps
    and go with it. Without one they are built for this call only. `lr` is a float or a one-element
    float32 tensor on the parameters' device, read by the kernel when it runs (so that a CUDA graph that
    captured the call follows a learning-rate schedule)."""
    if not params:
        return
    device = params[0].device
    dtype = params[0].dtype
    if dtype not in _TL:
        raise TypeError(f"adamw_step_triton: unsupported dtype {dtype}")
    for name, row in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        for p, t in zip(params, row):
            if t.dtype != dtype or t.shape != p.shape or not t.is_contiguous() or t.device != device:
                raise ValueError(f"adamw_step_triton: {name} must match their parameters' dtype, shape and "
                                 f"device and be contiguous; got {t.dtype} {tuple(t.shape)} on {t.device} "
                                 f"for a {dtype} {tuple(p.shape)} parameter on {device}")
    for s in steps:
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != device:
            raise ValueError("adamw_step_triton: steps must be one-element float32 tensors on the parameters' "
                             "device")
    if not all(p.is_contiguous() for p in params):
        raise ValueError("adamw_step_triton: parameters must be contiguous")
    odd = [t for row in (params, grads, exp_avgs, exp_avg_sqs) for t in row if t.data_ptr() % 16]
    if odd:
        raise ValueError(f"adamw_step_triton: {len(odd)} tensors do not start on a 16-byte boundary (views at an "
                         f"odd offset?); the kernel reads 16 bytes at a time")
    lr_on_device = isinstance(lr, torch.Tensor)
    if lr_on_device and (lr.dtype != torch.float32 or lr.numel() != 1 or lr.device != device):
        raise ValueError(f"adamw_step_triton: a tensor lr must be one float32 element on {device}; got {lr.dtype} "
                         f"{tuple(lr.shape)} on {lr.device}")
    cache = {} if cache is None else cache
    tables = cache.setdefault((dtype, device, BLOCK * ITERS), _Tables())
    tables.get([params, grads, exp_avgs, exp_avg_sqs, steps], device)
    n_chunks = tables.chunk_tensor.numel()
    dummy = tables.numels  # any device pointer for the flags that are off
    _adamw_kernel[(n_chunks,)](
        tables.ptrs, tables.numels, tables.chunk_tensor, tables.chunk_index,
        grad_norm if grad_norm is not None else dummy, found_inf if found_inf is not None else dummy,
        lr if lr_on_device else dummy, len(params), 0.0 if lr_on_device else float(lr), float(weight_decay),
        float(beta1), float(beta2), float(eps), float(max_norm),
        DTYPE=_TL[dtype], HAS_NORM=grad_norm is not None, HAS_FOUND=found_inf is not None,
        LR_ON_DEVICE=lr_on_device, BLOCK=BLOCK, ITERS=ITERS, num_warps=NUM_WARPS)
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:  # a list of one-element tensors: a lone 0-dim tensor would be read on the host as a Python scalar
        torch._foreach_add_(steps, [1.0 - found_inf.float()] * len(steps))
