"""A constructed passkey model: weights set by hand so the only way to answer is attention over the cache.

The vocabulary is split into filler tokens [0, V - n_keys) and key tokens [V - n_keys, V). A prompt is
filler with one key token hidden at some position; the model must output that key token. Weights:
- embedding: token t -> one-hot e_t, plus a constant "bias" channel, plus a "is a key" channel;
- every Mamba mixer and every FFN has its output projection zeroed, so they add nothing to the residual
  stream: no state can carry the key forward, only attention can fetch it;
- the first attention layer: every query is a large constant on one head dimension, every key carries the
  "is a key" channel there, so a key token's score beats filler by `margin` (nats) at any distance (no
  positional encoding); values carry the key token's one-hot; o_proj writes it back to its logit channel,
  amplified. Later attention layers are zeroed like the Mamba mixers, so the answer rests on one layer;
- lm_head reads the token channels.
So the prediction after any prompt is the hidden key token, retrieved from wherever it is in the cache:
chunked prefill, the static decode step and the graph must all keep every position visible.
"""

from __future__ import annotations

import torch

from ..config import JambaConfig


def passkey_config(base: JambaConfig | None = None, vocab_size: int = 64, n_keys: int = 16) -> JambaConfig:
    """`base`'s layer layout with a small vocabulary; hidden size must exceed vocab_size + 2."""
    base = base or JambaConfig.from_name("jamba-tiny", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    if base.hidden_size < vocab_size + 2 or base.head_dim < n_keys + 1:
        raise ValueError(f"passkey construction needs hidden_size >= vocab_size + 2 and head_dim > n_keys; "
                         f"got hidden {base.hidden_size}, vocab {vocab_size}, head_dim {base.head_dim}, keys {n_keys}")
    if not base.attention_layer_ids:
        raise ValueError("passkey construction needs at least one attention layer")
    return base.replace(vocab_size=vocab_size, tie_word_embeddings=False)


@torch.no_grad()
def make_passkey_model(model, n_keys: int = 16, margin: float = 30.0, gain: float = 20.0):
    """Overwrite `model`'s weights with the construction above (in place); returns the model."""
    cfg = model.config
    V, H, hd = cfg.vocab_size, cfg.hidden_size, cfg.head_dim
    bias_ch, key_ch = V, V + 1  # residual channels after the V token channels
    first_key = V - n_keys
    dev = model.lm_head.weight.device
    emb = torch.zeros(V, H, device=dev)
    emb[torch.arange(V), torch.arange(V)] = 1.0
    emb[:, bias_ch] = 1.0
    emb[first_key:, key_ch] = 1.0
    model.model.embed_tokens.weight.copy_(emb)
    retrieval_layer = cfg.attention_layer_ids[0]
    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.weight.fill_(1.0)
        layer.pre_ff_layernorm.weight.fill_(1.0)
        if layer.is_moe:
            layer.feed_forward.experts.down_proj.zero_()
        else:
            layer.feed_forward.down_proj.weight.zero_()
        if not layer.is_attention:
            layer.mamba.out_proj.weight.zero_()
            if layer.mamba.out_proj.bias is not None:
                layer.mamba.out_proj.bias.zero_()
            continue
        attn = layer.self_attn
        for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
            p.zero_()
        if i != retrieval_layer:
            continue
        # After RMSNorm a token's channels are scaled by sqrt(H / 3) (key tokens: 3 nonzero channels) or
        # sqrt(H / 2) (filler). k = 1 on head dimension 0 for a key token (0 for filler) and q = q_val there,
        # so the score gap is q_val * hd^-0.5: choose q_val so a key token wins by `margin` nats, whatever H.
        s_key = (H / 3) ** 0.5
        q_val = margin * hd ** 0.5
        for h in range(attn.n_heads):
            attn.q_proj.weight[h * hd, bias_ch] = q_val / (H / 2) ** 0.5  # filler query, scaled back
        for j in range(attn.n_kv):
            attn.k_proj.weight[j * hd, key_ch] = 1.0 / s_key
            for i in range(n_keys):  # value channel i+1 of each KV head = "is key token first_key + i"
                attn.v_proj.weight[j * hd + 1 + i, first_key + i] = 1.0 / s_key
        for h in range(attn.n_heads):
            for i in range(n_keys):
                attn.o_proj.weight[first_key + i, h * hd + 1 + i] = gain / attn.n_heads
    model.model.final_layernorm.weight.fill_(1.0)
    model.lm_head.weight.zero_()
    model.lm_head.weight[torch.arange(V), torch.arange(V)] = 1.0
    return model


def passkey_prompt(length: int, position: int, key: int, n_filler: int, batch: int = 1, seed: int = 0):
    """(batch, length) filler tokens in [0, n_filler) with `key` at `position`."""
    if not 0 <= position < length:
        raise ValueError(f"position {position} outside a prompt of {length} tokens")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_filler, (batch, length), generator=g)
    ids[:, position] = key
    return ids
