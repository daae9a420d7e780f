"""The ops dispatch picks the Triton kernels when asked, and they match the reference through it."""

import torch

import openjamba.ops as ops
from kernel_testing import rel_err
from openjamba.ops.causal_conv1d.triton import causal_conv1d_triton, causal_conv1d_update_triton
from openjamba.ops.cross_entropy.triton import cross_entropy_triton
from openjamba.ops.moe.grouped import moe_experts_grouped
from openjamba.ops.selective_scan.triton import selective_scan_triton
from openjamba.ops.selective_state_update.triton import selective_state_update_triton


def test_set_backend_triton_resolves_to_kernels(device):
    old = ops.get_backend()
    try:
        ops.set_backend("triton")
        expected = {
            "selective_scan": selective_scan_triton,
            "selective_state_update": selective_state_update_triton,
            "causal_conv1d": causal_conv1d_triton,
            "causal_conv1d_update": causal_conv1d_update_triton,
            "moe_experts": moe_experts_grouped,
            "cross_entropy": cross_entropy_triton,
        }
        for op, fn in expected.items():
            got, backend = ops.resolve(op, on_cuda=True)
            assert backend == "triton" and got is fn, op
        args = tuple(t.to(device) for t in (torch.randn(1, 7, 5), torch.randn(1, 7, 5), -torch.rand(5, 3),
                                            torch.randn(1, 7, 3), torch.randn(1, 7, 3)))
        Dk = torch.randn(5, device=device)
        y, h = ops.selective_scan(*args, D_skip=Dk)
        ops.set_backend("reference")
        yr, hr = ops.selective_scan(*args, D_skip=Dk)
        assert rel_err(y, yr) < 1e-5 and rel_err(h, hr) < 1e-5
    finally:
        ops.set_backend(old)
