"""Whole-model behaviour: cached decoding == full forward, padding isolation, losses, errors."""

import pytest
import torch
import torch.nn.functional as F

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.cache import CacheFullError
from openjamba.ops import moe_experts_ref


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = JambaConfig.from_name("jamba-tiny", **overrides)
    model = JambaForCausalLM(cfg).eval()
    with torch.no_grad():  # move away from init so that a wrong mapping or skipped term shows
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", ".D", "A_log", "dt_proj.bias", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("chunks", [[17], [5, 6, 1, 1, 1, 1, 1, 1], [1] * 17, [9, 8], [3, 3, 3, 8]])
def test_cache_continuation_matches_full_forward(chunks):
    model = _model(mamba_proj_bias=True)
    ids = torch.randint(0, 128, (3, 17))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, 32)
        parts, pos = [], 0
        for n in chunks:
            parts.append(model(ids[:, pos:pos + n], cache=cache).logits)
            pos += n
    assert cache.length == 17
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_leak():
    model = _model(mamba_proj_bias=True)  # in_proj bias is the hard case: padding must not reach the conv
    a = torch.randint(3, 128, (1, 9))
    b = torch.randint(3, 128, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(out[0], model(a).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, 4:], model(b).logits[0], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(out).all()
        # the same through a cache: prefill the padded batch in two chunks, then decode one token
        cache = model.new_cache(2, 16)
        model(batch[:, :6], attention_mask=mask[:, :6], cache=cache)
        model(batch[:, 6:], attention_mask=mask, cache=cache)
        nxt = torch.tensor([[7], [11]])
        step = model(nxt, cache=cache).logits[:, -1]
        torch.testing.assert_close(step[0], model(torch.cat([a, nxt[:1]], 1)).logits[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1], model(torch.cat([b, nxt[1:]], 1)).logits[0, -1], rtol=1e-5, atol=1e-5)


def test_loss_is_shifted_ce_plus_aux():
    model = _model()
    ids = torch.randint(0, 128, (2, 12))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, ce + model.config.router_aux_loss_coef * out.aux_loss)
    act = model(ids, labels=labels, activation_loss_coef=1e-2)
    torch.testing.assert_close(act.loss, out.loss + 1e-2 * act.activation_loss)


def test_aux_loss_formula_and_padding_exclusion():
    model = _model()
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    stats = []
    hooks = [layer.feed_forward.register_forward_hook(lambda m, i, o: stats.append((o[1], o[2])))
             for layer in model.model.layers if layer.is_moe]
    out = model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    X, K = model.config.num_experts, model.config.num_experts_per_tok
    f = sum(torch.bincount(i[keep].reshape(-1), minlength=X).float() for _, i in stats) / (keep.sum() * len(stats))
    P = sum(p[keep].sum(0) for p, _ in stats) / (keep.sum() * len(stats))
    torch.testing.assert_close(out.aux_loss, X * (f * P).sum())
    assert abs(f.sum().item() - K) < 1e-5


def test_all_dense_model_has_no_aux_and_trains():
    model = _model(num_experts=1, num_experts_per_tok=1).train()
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids)
    assert out.aux_loss is None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_every_parameter_gets_a_gradient():
    model = _model().train()
    ids = torch.randint(0, 128, (4, 16))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_tied_embeddings_share_storage():
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.param_counts()["total"]


def test_bf16_forward_close_to_fp32():
    model = _model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        out = model.to(torch.bfloat16)(ids).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(2, 5, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    cache = model.new_cache(2, 6)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.zeros(3, 2, dtype=torch.long), cache=cache)
    model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
    with pytest.raises(CacheFullError, match="4 of 6"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(TypeError, match="JambaConfig"):
        JambaForCausalLM({"hidden_size": 4})


def test_experts_run_in_the_autocast_dtype():
    """Under autocast the expert matmuls run in its dtype (like nn.Linear), and fp32 weights get gradients."""
    from openjamba.layers.moe import SparseMoE

    torch.manual_seed(0)
    moe = SparseMoE(JambaConfig.from_name("jamba-tiny"))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, moe.router.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs, idx = moe(x)
    assert out.dtype == torch.bfloat16
    # the same experts, given bf16 inputs and weights explicitly, without autocast
    top_w = probs.gather(1, idx).to(torch.bfloat16)
    want = moe_experts_ref(x.reshape(-1, x.shape[-1]).bfloat16(), top_w, idx,
                           moe.experts.gate_up_proj.bfloat16(), moe.experts.down_proj.bfloat16())
    assert torch.equal(out.reshape(-1, x.shape[-1]), want)
    out.float().square().sum().backward()
    for p in (moe.experts.gate_up_proj, moe.experts.down_proj):
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
