"""Shared helpers for the kernel tests: tolerances per dtype and a relative-error measure."""

import torch

# relative L2 error allowed between a kernel and its fp32 reference, per input dtype
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
