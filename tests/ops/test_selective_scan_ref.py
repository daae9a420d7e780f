"""The reference selective scans inside a CPU bf16 autocast region: fp32 inside, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openjamba.config import JambaConfig
from openjamba.model import JambaForCausalLM
from openjamba.ops import selective_scan_chunked, selective_scan_ref
from openjamba.ops.selective_scan.reference import _ChunkedScan

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _inputs(B=2, L=21, D=6, N=4):
    g = torch.Generator().manual_seed(0)
    return {"u": torch.randn(B, L, D, generator=g), "delta": 0.5 * torch.randn(B, L, D, generator=g),
            "A": -0.5 - torch.rand(D, N, generator=g), "B": torch.randn(B, L, N, generator=g),
            "C": torch.randn(B, L, N, generator=g), "D_skip": torch.randn(D, generator=g),
            "z": torch.randn(B, L, D, generator=g), "delta_bias": 0.1 * torch.randn(D, generator=g)}


@pytest.mark.parametrize("scan", [selective_scan_ref, selective_scan_chunked])
def test_scan_computes_in_fp32_under_autocast(scan):
    """Under autocast, outputs and gradients are the fp32 ones bit for bit: with the backward outside the
    region (as autocast recommends) and, for the chunked scan's own backward, inside it too."""
    def run(autocast: bool, backward_inside: bool = False):
        xs = {k: v.clone().requires_grad_() for k, v in _inputs().items()}
        with torch.autocast(**BF16, enabled=autocast):
            y, h = scan(**xs)
            loss = y.square().sum() + h.sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return y.detach(), h.detach(), {k: v.grad for k, v in xs.items()}

    y32, h32, grads32 = run(False)
    for y, h, grads in [run(True)] + ([run(True, True)] if scan is selective_scan_chunked else []):
        assert y.dtype == h.dtype == torch.float32
        assert torch.equal(y, y32) and torch.equal(h, h32)
        for k, g in grads.items():
            assert torch.equal(g, grads32[k]), k


def test_chunked_backward_accepts_a_bf16_output_gradient():
    """Called under autocast, the scan's einsums give a bf16 y, so its gradient arrives in bf16; the
    backward casts it to fp32 before it meets the fp32 states."""
    x = _inputs()
    leaves = {k: x[k].clone().requires_grad_() for k in ("delta", "A", "B", "C", "u")}

    def grads(autocast: bool):
        for t in leaves.values():
            t.grad = None
        delta = F.softplus(leaves["delta"])
        h0 = torch.zeros(2, 6, 4)
        with torch.autocast(**BF16, enabled=autocast):
            y, h = _ChunkedScan.apply(delta, leaves["A"], leaves["B"], leaves["C"], leaves["u"], h0, 8)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        (y.float().square().sum() + h.sum()).backward()
        return {k: t.grad.clone() for k, t in leaves.items()}

    got, want = grads(True), grads(False)
    for k, g in got.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), k
        torch.testing.assert_close(g, want[k], rtol=0.05, atol=0.05 * want[k].abs().max().item(), msg=k)


def test_tiny_model_backward_under_cpu_bf16_autocast():
    """jamba-tiny (Mamba, attention, MoE) trains under CPU bf16 autocast: gradients are finite and close to
    the fp32 ones. Loosely: bf16 rounding can send a token to another expert, which moves that MoE layer's
    gradients by ~20%, so each tensor is compared by direction and the whole gradient by norm."""
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    def grads(autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(**BF16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    loss, got = grads(True)
    loss32, want = grads(False)
    assert abs(loss - loss32) < 0.01 * loss32
    assert any(n.endswith("mamba.A_log") for n in got)  # the scan's own parameters are in the comparison
    for name, g in got.items():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert F.cosine_similarity(g.flatten(), want[name].flatten(), dim=0) > 0.9, name
    flat, flat32 = (torch.cat([g[n].flatten() for n in want]) for g in (got, want))
    assert (flat - flat32).norm() < 0.05 * flat32.norm()
