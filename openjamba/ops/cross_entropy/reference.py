"""Cross-entropy of next-token logits, pure PyTorch (the specification).

    logits: (T, V) any float dtype      targets: (T,) integer classes in [0, V), or ignore_index
    loss_r = lse_r - x[r, t_r]  with  lse_r = log sum_v exp x[r, v], computed in fp32
    returns the fp32 mean of loss_r over the n rows whose target is not ignore_index (nan when n = 0)

This is exactly F.cross_entropy(logits.float(), targets, ignore_index=ignore_index) after the input checks,
so the CPU path of the trainer is bit-identical to calling F.cross_entropy directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_inputs(logits, targets, ignore_index: int) -> None:
    """Shapes and dtypes, and (on tensors off CUDA, where it needs no host sync) the target range."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (tokens, vocab), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D (tokens,), got shape {tuple(targets.shape)}")
    if targets.dtype not in _INT_DTYPES:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    T, V = logits.shape
    if targets.shape[0] != T:
        raise ValueError(f"targets has {targets.shape[0]} entries but logits has {T} rows")
    if V == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}")
    if not targets.is_cuda and T:
        bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"target {int(targets[bad][0])} is out of range for a vocabulary of {V} "
                             f"(and is not ignore_index={ignore_index})")


def cross_entropy_ref(logits, targets, ignore_index: int = -100):
    """Mean fp32 cross-entropy over the non-ignored rows; differentiable in logits."""
    check_inputs(logits, targets, ignore_index)
    return F.cross_entropy(logits.float(), targets.long(), ignore_index=ignore_index)
