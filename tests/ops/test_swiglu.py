"""The experts' gated activation kernel (ops/moe/swiglu.py) against silu(gate) * up: output and gradient."""

import pytest
import torch

from openjamba.ops.moe import swiglu as sw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 24), (3, 2 * 1100)])  # F within one 1024-wide tile, and over two
def test_swiglu_kernel_matches_the_expression(shape, dtype, device, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1") if device == "cpu" else None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    dy = torch.randn(shape[0], shape[1] // 2, generator=g).to(device, dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = sw._SwiGLU.apply(a)
    # the reference in fp32, rounded once: what the kernel computes
    y_ref = sw.swiglu_ref(b.float())
    (y_ref * dy.float()).sum().backward()
    (y.float() * dy.float()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
    assert y.dtype == dtype and y.shape == (shape[0], shape[1] // 2)
    torch.testing.assert_close(y.float(), y_ref.to(dtype).float(), **tol)
    torch.testing.assert_close(a.grad.float(), b.grad.to(dtype).float(), **tol)


def test_swiglu_takes_the_expression_off_cuda_and_refuses_odd_widths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 10)
    torch.testing.assert_close(sw.swiglu(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])
    with pytest.raises(ValueError, match=r"must be \(rows, 2F\)"):
        sw.swiglu(torch.randn(4, 9))
