"""Helpers shared by the checkpoint and transformers-parity tests."""

from __future__ import annotations

import torch

# Small configs covering the layouts a checkpoint converter can get wrong. Field names are the
# transformers ones, so each dict builds both a transformers.JambaConfig and an openjamba JambaConfig.
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
            expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
            mamba_expand=2, mamba_dt_rank=4, mamba_conv_bias=True, mamba_proj_bias=False,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    # attention 1:3 at layer 2, MoE on odd layers, top-2 of 4
    "base": BASE,
    # attention every other layer from 0, MoE at 2 and 5, top-1 of 3, no conv bias, in/out proj bias
    "top1_offsets": dict(BASE, num_hidden_layers=6, attn_layer_period=2, attn_layer_offset=0,
                         expert_layer_period=3, expert_layer_offset=2, num_experts=3, num_experts_per_tok=1,
                         mamba_conv_bias=False, mamba_proj_bias=True),
    # num_experts=1: every FFN is a dense MLP; tied embeddings; MQA
    "dense_tied": dict(BASE, num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=1, num_experts=1,
                       num_experts_per_tok=1, num_key_value_heads=1, tie_word_embeddings=True),
    # 8 experts on every layer, proj bias and tied embeddings, other Mamba sizes
    "moe_everywhere": dict(BASE, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                           intermediate_size=24, num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=3,
                           expert_layer_period=1, expert_layer_offset=0, num_experts=8, mamba_d_state=4,
                           mamba_d_conv=3, mamba_expand=1, mamba_dt_rank=6, mamba_proj_bias=True,
                           tie_word_embeddings=True),
}


@torch.no_grad()
def randomize_(model, seed: int = 0):
    """Overwrite every parameter with values far from any initialisation, so that a tensor loaded into
    the wrong place, transposed, or left at its init changes the logits by far more than the tolerance.

    Works by name on both openjamba and transformers models (the same names, experts fused in both).
    Weights get std 1/sqrt(fan_in) so activations stay O(1); norms, A_log, D and the dt bias are moved
    off their constant inits; the router is scaled up so that routing is decisive (no near-ties whose
    order could flip on rounding).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)

    for name, p in model.state_dict(keep_vars=True).items():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * randn(p))
        elif name.endswith("A_log"):
            p.add_(0.5 * randn(p))
        elif name.endswith(".D"):
            p.copy_(1.0 + 0.5 * randn(p))
        elif name.endswith("dt_proj.bias"):
            p.copy_(0.5 * randn(p) - 2.0)
        elif name.endswith("bias"):
            p.copy_(0.2 * randn(p))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(randn(p))
        elif name.endswith("router.weight"):
            p.copy_(3.0 * randn(p) / p.shape[-1] ** 0.5)
        else:
            p.copy_(randn(p) / p.shape[-1] ** 0.5)
    return model


def max_diff(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()
