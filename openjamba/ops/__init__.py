"""Ops with a pure-PyTorch reference (the specification) and, where written, a Triton kernel.

The backend is chosen explicitly and visibly:
    openjamba.ops.set_backend("auto" | "reference" | "triton")   or   OPENJAMBA_BACKEND=...
"auto" runs the Triton kernels on CUDA tensors when Triton is importable and the reference elsewhere;
"triton" forces the kernels and is an error where they cannot run; "reference" forces PyTorch.
The choice made for each op is logged once (logger "openjamba.ops").
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from .adamw.reference import adamw_step_ref
from .causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from .cross_entropy.reference import cross_entropy_ref
from .moe.reference import moe_experts_ref
from .selective_scan.reference import selective_scan_chunked, selective_scan_ref
from .selective_state_update.reference import selective_state_update_ref

logger = logging.getLogger("openjamba.ops")

BACKENDS = ("auto", "reference", "triton")

# op name -> (reference function, "module:function" of the Triton kernel)
_OPS = {
    "selective_scan": (selective_scan_chunked, "openjamba.ops.selective_scan.triton:selective_scan_triton"),
    "selective_state_update": (selective_state_update_ref,
                               "openjamba.ops.selective_state_update.triton:selective_state_update_triton"),
    "causal_conv1d": (causal_conv1d_ref, "openjamba.ops.causal_conv1d.triton:causal_conv1d_triton"),
    "causal_conv1d_update": (causal_conv1d_update_ref,
                             "openjamba.ops.causal_conv1d.triton:causal_conv1d_update_triton"),
    "moe_experts": (moe_experts_ref, "openjamba.ops.moe.grouped:moe_experts_grouped"),
    "cross_entropy": (cross_entropy_ref, "openjamba.ops.cross_entropy.triton:cross_entropy_triton"),
    "adamw": (adamw_step_ref, "openjamba.ops.adamw.triton:adamw_step_triton"),
}

_backend = None
_kernels: dict[str, object] = {}
_logged: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here."""


def _load_kernel(op: str):
    if op not in _kernels:
        module, fn = _OPS[op][1].split(":")
        try:
            _kernels[op] = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            _kernels[op] = e
    return _kernels[op]


def load_kernels() -> None:
    """Import every op's Triton kernel module now. torch.compile callers do this first: an import reached
    while Dynamo traces a layer (the first call of each op) would split that layer's graph."""
    for op in _OPS:
        _load_kernel(op)


def _interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_usable() -> str | None:
    """None when Triton kernels can run on CUDA tensors here, else the reason they cannot."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and not _interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"
    return None


def set_backend(name: str) -> None:
    """Choose the ops backend for the whole process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose one of {BACKENDS}")
    if name == "triton":
        reason = _triton_usable()
        if reason:
            raise BackendUnavailable(f"ops backend 'triton' was requested but cannot run: {reason}")
    _backend = name
    _logged.clear()


def get_backend() -> str:
    if _backend is None:
        set_backend(os.environ.get("OPENJAMBA_BACKEND", "auto"))
    return _backend


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def resolve(op: str, on_cuda: bool):
    """The function that runs `op` for tensors on CUDA (on_cuda) or elsewhere, and its backend name."""
    backend = get_backend()
    ref = _OPS[op][0]
    if backend == "reference" or (backend == "auto" and not on_cuda):
        choice, fn = "reference", ref
    else:
        kernel = _load_kernel(op)
        if isinstance(kernel, Exception):
            if backend == "triton":
                raise BackendUnavailable(f"ops backend 'triton': no kernel for {op} ({kernel})")
            choice, fn = "reference", ref  # auto: this op has no kernel yet
        elif backend == "triton" and not on_cuda and not _interpreting():
            raise BackendUnavailable(f"ops backend 'triton' needs CUDA tensors for {op}")
        else:
            choice, fn = "triton", kernel
    if (op, choice) not in _logged and not _compiling():  # logging would break a torch.compile graph
        _logged.add((op, choice))
        logger.info("openjamba op %s: %s backend", op, choice)
    return fn, choice


def selective_scan(u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None):
    """See ops/selective_scan/reference.py. Returns (y, final_state)."""
    fn, _ = resolve("selective_scan", u.is_cuda)
    return fn(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, initial_state)


def selective_state_update(state, u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=True):
    fn, _ = resolve("selective_state_update", u.is_cuda)
    return fn(state, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus)


def causal_conv1d(x, weight, bias=None, activation="silu", initial_state=None):
    fn, _ = resolve("causal_conv1d", x.is_cuda)
    return fn(x, weight, bias, activation, initial_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    fn, _ = resolve("causal_conv1d_update", x.is_cuda)
    return fn(x, conv_state, weight, bias, activation)


def moe_experts(x_TH, top_w_TK, top_idx_TK, w_gate_up_XFH, w_down_XHF):
    # torch's CUDA grouped GEMM is built for bf16; other dtypes take the per-expert loop (chosen visibly)
    on_cuda = x_TH.is_cuda
    if on_cuda and x_TH.dtype != torch.bfloat16 and not _interpreting():
        if get_backend() == "triton":
            raise BackendUnavailable(f"ops backend 'triton': the CUDA grouped GEMM of moe_experts needs bf16 "
                                     f"inputs, got {x_TH.dtype}")
        on_cuda = False
        if ("moe_experts", str(x_TH.dtype)) not in _logged and not _compiling():
            _logged.add(("moe_experts", str(x_TH.dtype)))
            logger.info("openjamba op moe_experts: reference backend for %s on CUDA (grouped GEMM needs bf16)",
                        x_TH.dtype)
    fn, _ = resolve("moe_experts", on_cuda)
    return fn(x_TH, top_w_TK, top_idx_TK, w_gate_up_XFH, w_down_XHF)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean fp32 cross-entropy of (T, V) logits against (T,) targets over the rows that are not ignore_index.
    See ops/cross_entropy/reference.py."""
    fn, _ = resolve("cross_entropy", logits.is_cuda)
    return fn(logits, targets, ignore_index)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decay, beta1, beta2, eps, grad_norm=None,
               max_norm=float("inf"), found_inf=None, cache=None):
    """AdamW over lists of tensors with gradient-norm clipping folded in; see ops/adamw/reference.py.
    `cache`, a dict the caller keeps per tensor list, holds the Triton kernel's address tables between calls."""
    if not params:
        return
    fn, choice = resolve("adamw", params[0].is_cuda)
    extra = {"cache": cache} if choice == "triton" else {}
    fn(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decay, beta1, beta2, eps, grad_norm=grad_norm,
       max_norm=max_norm, found_inf=found_inf, **extra)


__all__ = [
    "BACKENDS", "BackendUnavailable", "set_backend", "get_backend", "resolve",
    "selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update", "moe_experts",
    "cross_entropy", "adamw_step", "adamw_step_ref", "selective_scan_ref", "selective_scan_chunked",
    "selective_state_update_ref", "causal_conv1d_ref", "causal_conv1d_update_ref", "moe_experts_ref",
    "cross_entropy_ref",
]
