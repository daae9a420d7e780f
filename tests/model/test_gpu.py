"""The GPU path (CUDA, bf16, SDPA kernels, the default ops backend) against the CPU fp32 model."""

import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM

pytestmark = pytest.mark.gpu


def _pair(**overrides):
    torch.manual_seed(0)
    cfg = JambaConfig.from_name("jamba-tiny", hidden_size=128, num_attention_heads=4, intermediate_size=256,
                                **overrides)
    cpu = JambaForCausalLM(cfg).eval()
    gpu = JambaForCausalLM(cfg).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def test_cuda_fp32_matches_cpu():
    cpu, gpu = _pair()
    ids = torch.randint(0, 128, (2, 300))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, rtol=2e-3, atol=2e-3)


def test_cuda_bf16_cached_decoding_matches_full_forward():
    _, gpu = _pair()
    gpu = gpu.to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    with torch.no_grad():
        full = gpu(ids).logits.float()
        cache = gpu.new_cache(2, 64)
        parts = [gpu(ids[:, :25], cache=cache).logits] + [gpu(ids[:, t:t + 1], cache=cache).logits
                                                         for t in range(25, 40)]
    out = torch.cat(parts, 1).float()
    assert (out - full).abs().max() < 0.03 * full.abs().max()


def test_cuda_bf16_training_step_is_finite():
    _, gpu = _pair()
    gpu = gpu.to(torch.bfloat16).train()
    ids = torch.randint(0, 128, (4, 256), device="cuda")
    loss = gpu(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
