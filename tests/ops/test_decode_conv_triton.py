"""Triton causal conv1d (forward, backward, one-token update) and selective_state_update vs references."""

import importlib

import pytest
import torch

from kernel_testing import TOL, rel_err
from openjamba.ops.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from openjamba.ops.causal_conv1d.triton import causal_conv1d_triton, causal_conv1d_update_triton
from openjamba.ops.selective_state_update.reference import selective_state_update_ref
from openjamba.ops.selective_state_update.triton import selective_state_update_triton


def conv_check(b, L, D, K, dtype, device, with_init=True, with_bias=True, activation="silu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, L, D, generator=g).to(dtype).to(device).requires_grad_()
    w = torch.randn(D, K, generator=g).to(device).requires_grad_()
    bias = torch.randn(D, generator=g).to(device).requires_grad_() if with_bias else None
    init = torch.randn(b, K - 1, D, generator=g).to(dtype).to(device).requires_grad_() if with_init else None
    y, f = causal_conv1d_triton(x, w, bias, activation, init)
    leaves = [t for t in (x, w, bias, init) if t is not None]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    xr, wr = next(it), next(it)
    br = next(it) if with_bias else None
    ir = next(it) if with_init else None
    yr, fr = causal_conv1d_ref(xr, wr, br, activation, ir)
    assert y.dtype == dtype and y.shape == (b, L, D) and f.shape == (b, K - 1, D)
    tol = TOL[dtype]
    assert rel_err(y, yr) < tol and rel_err(f, fr) < tol
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    g1 = torch.autograd.grad((y.float() * gy).sum() + (f.float() * gf).sum(), leaves)
    g2 = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), ref_leaves)
    for a, r in zip(g1, g2):
        assert rel_err(a, r) < 2 * tol


@pytest.mark.parametrize("b,L,D,K", [(2, 1, 5, 4), (1, 63, 19, 4), (2, 1000, 7, 4), (1, 2, 9, 3), (1, 5, 3, 1)])
def test_conv_fp32(b, L, D, K, device):
    conv_check(b, L, D, K, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_half(dtype, device):
    conv_check(2, 37, 12, 4, dtype, device)


@pytest.mark.parametrize("cfg", [(4, 8, 2), (4, 4, 1), (8, 64, 1)])
def test_conv_tilings(cfg, device, monkeypatch):
    """Other tilings (forward and backward): short blocks and chunks (several warm-up blocks and chunk seams, blocks of
    exactly K - 1 rows), two warps."""
    monkeypatch.setattr(importlib.import_module("openjamba.ops.causal_conv1d.triton"), "TILES_OVERRIDE", cfg)
    conv_check(2, 45, 10, 4, torch.float32, device)
    conv_check(1, 2, 3, 4, torch.float32, device)


def test_conv_block_shorter_than_window(device, monkeypatch):
    monkeypatch.setattr(importlib.import_module("openjamba.ops.causal_conv1d.triton"), "TILES_OVERRIDE", (2, 8, 1))
    with pytest.raises(ValueError, match="conv BLOCK_T 2 < K - 1 = 3"):
        conv_check(1, 9, 3, 4, torch.float32, device)


def test_conv_no_init_no_bias_no_act(device):
    conv_check(2, 33, 10, 4, torch.float32, device, with_init=False, with_bias=False, activation=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [4, 2])
def test_conv_update(dtype, K, device):
    """Token-by-token updates reproduce the full conv and leave the same state."""
    b, L, D = 3, 6, 21
    x = torch.randn(b, L, D, device=device).to(dtype)
    w, bias = torch.randn(D, K, device=device), torch.randn(D, device=device)
    init = torch.randn(b, K - 1, D, device=device).to(dtype)
    state, state_ref = init.clone(), init.clone()
    for t in range(L):
        y = causal_conv1d_update_triton(x[:, t], state, w, bias)
        yr = causal_conv1d_update_ref(x[:, t], state_ref, w, bias)
        assert rel_err(y, yr) < TOL[dtype]
        assert torch.equal(state, state_ref)
    y_full, f_full = causal_conv1d_ref(x, w, bias, "silu", init)
    assert rel_err(y, y_full[:, -1]) < TOL[dtype] and torch.equal(state, f_full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [16, 5])
def test_selective_state_update(dtype, N, device):
    b, D = 3, 37
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    state = r(b, D, N)
    state_ref = state.clone()
    u, delta, z = r(b, D).to(dtype), r(b, D).to(dtype), r(b, D).to(dtype)
    A = -torch.rand(D, N, generator=g).to(device) * 2
    B, C, Dk, bias = r(b, N).to(dtype), r(b, N).to(dtype), r(D), r(D)
    y = selective_state_update_triton(state, u, delta, A, B, C, Dk, z, bias)
    yr = selective_state_update_ref(state_ref, u, delta, A, B, C, Dk, z, bias)
    assert y.dtype == dtype
    assert rel_err(y, yr) < TOL[dtype] and rel_err(state, state_ref) < 1e-5
    y = selective_state_update_triton(state, u, delta, A, B, C)  # no skip, gate or bias
    yr = selective_state_update_ref(state_ref, u, delta, A, B, C)
    assert rel_err(y, yr) < TOL[dtype] and rel_err(state, state_ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_gpu(dtype):
    conv_check(4, 2048, 2048, 4, dtype, "cuda")
    conv_check(1, 1000, 1000, 4, dtype, "cuda")
