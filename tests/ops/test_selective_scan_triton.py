"""Triton selective scan vs the sequential reference: outputs, final states, every gradient."""

import importlib

import pytest
import torch

from openjamba.ops.selective_scan.reference import selective_scan_ref
from openjamba.ops.selective_scan.triton import selective_scan_triton

from kernel_testing import TOL, rel_err

NAMES = ["u", "delta", "A", "B", "C", "D_skip", "z", "delta_bias", "initial_state"]


def make_inputs(b, L, D, N, dtype, device, seed=0, with_h0=True, with_z=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift)

    x = dict(
        u=r(b, L, D).to(dtype), delta=r(b, L, D, scale=0.5, shift=-1.0).to(dtype),
        A=-(torch.rand(D, N, generator=g) * 3 + 0.1), B=r(b, L, N).to(dtype), C=r(b, L, N).to(dtype),
        D_skip=r(D), z=r(b, L, D).to(dtype) if with_z else None,
        delta_bias=r(D, scale=0.3) if with_bias else None,
        initial_state=r(b, D, N) if with_h0 else None,
    )
    return {k: (v.to(device).requires_grad_() if v is not None else None) for k, v in x.items()}


def run(fn, x):
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D_skip"], x["z"], x["delta_bias"], True,
              x["initial_state"])


def check(b, L, D, N, dtype, device, **kw):
    x = make_inputs(b, L, D, N, dtype, device, **kw)
    y, h = run(selective_scan_triton, x)
    # the reference runs on the same (rounded) inputs, upcast to fp32
    xr = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in x.items()}
    yr, hr = run(selective_scan_ref, xr)
    assert y.dtype == dtype and h.dtype == torch.float32 and y.shape == (b, L, D) and h.shape == (b, D, N)
    tol = TOL[dtype]
    assert rel_err(y, yr) < tol
    assert rel_err(h, hr) < tol
    gy = torch.randn(b, L, D, device=device)
    gh = torch.randn(b, D, N, device=device)
    names = [k for k in NAMES if x[k] is not None]
    g1 = torch.autograd.grad((y.float() * gy).sum() + (h * gh).sum(), [x[k] for k in names])
    g2 = torch.autograd.grad((yr * gy).sum() + (hr * gh).sum(), [xr[k] for k in names])
    for k, a, r in zip(names, g1, g2):
        assert a.dtype == x[k].dtype and a.shape == x[k].shape, k
        assert rel_err(a, r) < 3 * tol, (k, rel_err(a, r))


@pytest.mark.parametrize("b,L,D,N", [(2, 1, 5, 3), (1, 63, 6, 4), (1, 1000, 3, 2), (2, 20, 9, 16)])
def test_scan_fp32(b, L, D, N, device):
    check(b, L, D, N, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half(dtype, device):
    check(2, 21, 6, 4, dtype, device)


def test_scan_optional_inputs_absent(device):
    check(1, 17, 5, 4, torch.float32, device, with_h0=False, with_z=False, with_bias=False)


def test_scan_large_state(device):
    check(1, 9, 3, 40, torch.float32, device)  # N not a power of two, > 32


def test_scan_chunked_continuation(device):
    """Scanning [0, L1) then [L1, L) from the carried state equals one scan, and gradients flow."""
    x = make_inputs(1, 30, 5, 4, torch.float32, device)
    y, h = run(selective_scan_triton, x)
    part = lambda k, s: x[k][:, s] if x[k].dim() == 3 and k not in ("initial_state",) else x[k]
    x1 = {k: part(k, slice(0, 11)) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    y1, h1 = run(selective_scan_triton, x1)
    x2 = {k: part(k, slice(11, 30)) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    x2["initial_state"] = h1
    y2, h2 = run(selective_scan_triton, x2)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-5 and rel_err(h2, h) < 1e-5
    g_full = torch.autograd.grad(h.sum() + y.sum(), x["u"])[0]
    g_split = torch.autograd.grad(h2.sum() + y1.sum() + y2.sum(), x["u"])[0]
    assert rel_err(g_split, g_full) < 1e-5


def test_scan_non_contiguous_inputs(device):
    """B and C as column slices of one projection output, as the model produces them."""
    x = make_inputs(2, 13, 7, 4, torch.float32, device)
    proj = torch.randn(2, 13, 3 + 8, device=device)
    x["B"], x["C"] = proj[..., 3:7], proj[..., 7:11]
    y, h = run(selective_scan_triton, x)
    yr, hr = run(selective_scan_ref, x)
    assert rel_err(y, yr) < 1e-5 and rel_err(h, hr) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,L,D,N", [(2, 1000, 200, 16), (1, 63, 1536, 16), (1, 1, 64, 16), (1, 300, 96, 256),
                                     (4, 70, 2112, 16)])  # the last: a grid large enough for the wider backward tile
def test_scan_gpu(b, L, D, N, dtype):
    check(b, L, D, N, dtype, "cuda")


@pytest.mark.parametrize("cfg", [((8, 4, 2), (8, 8, 1)), ((8, 8, 4), (2, 4, 2)), ((4, 16, 4), (4, 16, 4)),
                                 ((8, 4, 2, 128), (4, 8, 2, 96))])
def test_scan_tile_configs(cfg, device, monkeypatch):
    """Other tilings, including backward blocks shorter than the forward ones (states saved mid-block)
    and register caps (maxnreg: spills on the GPU)."""
    monkeypatch.setattr(importlib.import_module("openjamba.ops.selective_scan.triton"), "CONFIG_OVERRIDE", cfg)
    check(2, 27, 6, 4, torch.float32, device)


@pytest.mark.parametrize("chunks", [2, 5])
def test_scan_chunk_parallel_forward(chunks, device, monkeypatch):
    """The sequence split into chunks scanned in parallel (two passes) gives the same results."""
    monkeypatch.setattr(importlib.import_module("openjamba.ops.selective_scan.triton"), "CHUNKS_OVERRIDE", chunks)
    check(2, 45, 6, 4, torch.float32, device)
    check(1, 45, 6, 4, torch.float32, device, with_h0=False)


@pytest.fixture
def deterministic():
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _grads_BC(x):
    y, h = run(selective_scan_triton, x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    return torch.autograd.grad((y.float() * gy).sum() + h.sum(), [x["B"], x["C"]])


def test_scan_deterministic_mode(device, deterministic):
    """In torch's deterministic mode dB and dC (sums over channel programs, atomic adds otherwise) are
    summed from one slice per program: right against the reference and bit-identical between runs."""
    check(2, 21, 40, 4, torch.float32, device)  # 40 channels: several channel programs
    x = make_inputs(2, 21, 40, 4, torch.float32, device)
    for a, b in zip(_grads_BC(x), _grads_BC(x)):
        assert torch.equal(a, b)


def test_scan_atomic_sums_match_deterministic(device, deterministic):
    x = make_inputs(2, 33, 40, 4, torch.float32, device)
    det = _grads_BC(x)
    torch.use_deterministic_algorithms(False)
    for a, b in zip(_grads_BC(x), det):
        assert rel_err(a, b) < 1e-6
