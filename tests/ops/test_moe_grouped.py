"""Grouped-matmul MoE vs the per-expert reference loop: output and every gradient."""

import pytest
import torch

from kernel_testing import rel_err
from openjamba.ops.moe.grouped import moe_experts_grouped
from openjamba.ops.moe.reference import moe_experts_ref


def moe_check(T, H, F, X, K, dtype, device, tol, skew=False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g).to(device, dtype).requires_grad_()
    logits = torch.randn(T, X, generator=g).to(device)
    if skew:  # most tokens to one expert, some experts empty
        logits[:, 0] += 4.0
        logits[:, -1] -= 100.0
    w, idx = logits.softmax(-1).topk(K, dim=-1)
    w = w.detach().requires_grad_()
    wg = (torch.randn(X, 2 * F, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    wd = (torch.randn(X, H, F, generator=g) * F ** -0.5).to(device, dtype).requires_grad_()
    out = moe_experts_grouped(x, w, idx, wg, wd)
    ref = moe_experts_ref(x, w, idx, wg, wd)
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out, ref) < tol
    go = torch.randn(T, H, device=device, dtype=dtype)
    g1 = torch.autograd.grad((out * go).sum(), [x, w, wg, wd])
    g2 = torch.autograd.grad((ref * go).sum(), [x, w, wg, wd])
    for a, r in zip(g1, g2):
        assert rel_err(a, r) < tol


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("T", [1, 37])
def test_moe_fp32(T, skew, device):
    if device == "cuda":
        pytest.skip("the CUDA grouped GEMM runs bf16")
    moe_check(T, 16, 24, 5, 2, torch.float32, device, 1e-5, skew)


@pytest.mark.parametrize("skew", [False, True])
def test_moe_bf16(skew, device):
    moe_check(45, 32, 40, 4, 2, torch.bfloat16, device, 2e-2, skew)


def test_moe_no_host_sync_in_routing():
    """The routing arithmetic must not call .tolist()/.item(): run it with every host read forbidden."""
    import unittest.mock as mock

    x = torch.randn(9, 16)
    w, idx = torch.randn(9, 4).softmax(-1).topk(2, -1)
    wg, wd = torch.randn(4, 48, 16), torch.randn(4, 16, 24)
    with mock.patch.object(torch.Tensor, "tolist", side_effect=AssertionError("host sync")), \
            mock.patch.object(torch.Tensor, "item", side_effect=AssertionError("host sync")):
        out = moe_experts_grouped(x, w, idx, wg, wd)
    assert rel_err(out, moe_experts_ref(x, w, idx, wg, wd)) < 1e-5


@pytest.mark.gpu
def test_moe_gpu_real_size():
    moe_check(4096, 1024, 2816, 8, 2, torch.bfloat16, "cuda", 2e-2)
    moe_check(1000, 1024, 2816, 16, 2, torch.bfloat16, "cuda", 2e-2, skew=True)


@pytest.mark.gpu
def test_moe_non_bf16_on_cuda_takes_the_reference_visibly(monkeypatch):
    """torch's CUDA grouped GEMM is built for bf16: fp32 inputs run the per-expert loop under "auto" and
    are an error when the kernels are forced."""
    from openjamba import ops

    x = torch.randn(37, 16, device="cuda")
    w, idx = torch.randn(37, 5, device="cuda").softmax(-1).topk(2, -1)
    wg, wd = torch.randn(5, 48, 16, device="cuda"), torch.randn(5, 16, 24, device="cuda")
    monkeypatch.setattr(ops, "_backend", "auto")
    assert rel_err(ops.moe_experts(x, w, idx, wg, wd), moe_experts_ref(x, w, idx, wg, wd)) < 1e-6
    monkeypatch.setattr(ops, "_backend", "triton")
    with pytest.raises(ops.BackendUnavailable, match="needs bf16"):
        ops.moe_experts(x, w, idx, wg, wd)
