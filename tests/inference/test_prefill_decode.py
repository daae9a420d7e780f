"""Chunked prefill and the static (graph-shaped) decode step against the model's full forward."""

import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.generation import generate as reference_generate
from openjamba.inference import Generator, generate, moe_forward_static
from openjamba.inference.step import grouped_mm_works, resolve_moe_impl


def _model(**overrides):
    torch.manual_seed(0)
    cfg = JambaConfig.from_name("jamba-tiny", **overrides)
    return JambaForCausalLM(cfg).eval()


def _left_padded(B=3, T=29, pads=(0, 4, 11), vocab=128):
    ids = torch.randint(0, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_prefill_then_decode_matches_full_forward(mode, chunk):
    """Prefill in chunks, then feed the rest token by token: every logit equals one full forward."""
    model = _model()
    ids, mask = _left_padded()
    T_prompt = 20
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits  # (B, T, V)
    gen = Generator(model, 3, 40, mode=mode, chunk_size=chunk)
    last = gen.prefill(ids[:, :T_prompt], mask[:, :T_prompt])
    torch.testing.assert_close(last, full[:, T_prompt - 1], rtol=1e-4, atol=1e-4)
    for t in range(T_prompt, ids.shape[1]):
        logits = gen.decode_one_token(ids[:, t])
        torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)
    assert gen.cache.length == ids.shape[1] and int(gen.cache.pos) == ids.shape[1]


def test_pure_mamba_model_keeps_no_per_position_cache_and_decodes_left_padded_rows():
    """Without attention layers nothing reads keys: the cache holds the conv and SSM states only (no mask
    or position index per cached position, and the planner counts none), and padded rows still decode as
    the full forward."""
    from openjamba.inference.planner import plan_memory

    model = _model(attn_layer_period=5, attn_layer_offset=4)  # 4 layers: no attention layer
    assert model.config.attention_layer_ids == []
    ids, mask = _left_padded()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    for mode in ("eager", "static"):
        gen = Generator(model, 3, 4096, mode=mode, chunk_size=8)
        assert gen.cache.key_mask.numel() == 0 and gen.cache.positions.numel() == 0
        last = gen.prefill(ids[:, :20], mask[:, :20])
        torch.testing.assert_close(last, full[:, 19], rtol=1e-4, atol=1e-4)
        for t in range(20, ids.shape[1]):
            torch.testing.assert_close(gen.decode_one_token(ids[:, t]), full[:, t], rtol=1e-4, atol=1e-4)
    assert plan_memory(model.config, torch.float32, 3, 4096).detail["key_mask"] == 0
    cache = _model().new_cache(3, 4096)  # a hybrid keeps them, and the planner counts them exactly
    assert plan_memory(_model().config, torch.float32, 3, 4096).detail["key_mask"] == \
        cache.key_mask.numel() * cache.key_mask.element_size() + cache.positions.numel() * 8 == 3 * 4096 + 4096 * 8


def test_left_padded_rows_match_rows_alone():
    model = _model()
    ids, mask = _left_padded()
    gen = Generator(model, 3, 64, mode="static", chunk_size=7)
    batched = gen.prefill(ids, mask)
    for b in range(3):
        real = ids[b:b + 1, mask[b].bool()]
        alone = Generator(model, 1, 64, mode="static", chunk_size=7).prefill(real)
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 4])
def test_static_greedy_tokens_equal_eager(batch):
    model = _model()
    ids = torch.randint(0, 128, (batch, 17))
    eager = generate(model, ids, max_new_tokens=24, temperature=0, mode="eager")
    static = generate(model, ids, max_new_tokens=24, temperature=0, mode="static")
    assert eager.shape == (batch, 17 + 24)
    assert torch.equal(eager, static)


def test_static_matches_reference_generation_module():
    """Same tokens as openjamba.generation.generate (greedy, left-padded batch)."""

    model = _model()
    ids, mask = _left_padded()
    ours = generate(model, ids, mask, max_new_tokens=10, temperature=0, mode="static")
    ref = reference_generate(model, ids, attention_mask=mask, max_new_tokens=10, temperature=0)
    assert torch.equal(ours, ref)


def test_sync_free_moe_routings_match_reference():
    model = _model()
    moe = next(layer.feed_forward for layer in model.model.layers if layer.is_moe)
    x = torch.randn(5, 1, model.config.hidden_size)
    with torch.no_grad():
        want, _, _ = moe(x)
        for impl in ("dense", "grouped_mm"):
            torch.testing.assert_close(moe_forward_static(moe, x, impl), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown MoE"):
        resolve_moe_impl("bogus", "cpu", torch.float32)


def test_grouped_mm_is_not_chosen_where_it_would_sync():
    """On CUDA only bf16 runs torch._grouped_mm without reading offsets on the host (graph capture)."""
    assert "host-synchronising" in grouped_mm_works("cuda", torch.float32)
    with pytest.raises(RuntimeError, match="host-synchronising"):
        resolve_moe_impl("grouped_mm", "cuda", torch.float16)


def test_eos_stops_and_pads():
    model = _model()
    ids = torch.randint(0, 128, (2, 9))
    free = generate(model, ids, max_new_tokens=12, temperature=0, mode="static")
    eos = int(free[0, 9 + 2])  # row 0's third new token
    out = generate(model, ids, max_new_tokens=12, temperature=0, mode="static", eos_token_id=eos, pad_token_id=7)
    row0 = out[0, 9:].tolist()
    k = row0.index(eos)
    assert all(t == 7 for t in row0[k + 1:])
    if eos in free[1, 9:].tolist():  # both rows end: trailing all-finished steps are trimmed
        assert out.shape[1] - 9 == max(free[b, 9:].tolist().index(eos) for b in range(2)) + 1


def test_cache_full_and_batch_mismatch_are_errors():
    model = _model()
    gen = Generator(model, 2, 8, mode="static")
    with pytest.raises(ValueError, match="batch 2"):
        gen.prefill(torch.zeros(3, 4, dtype=torch.long))
    gen.prefill(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(RuntimeError, match="do not fit"):
        gen.decode_one_token(torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="CUDA"):
        Generator(model, 1, 8, mode="graph") if not torch.cuda.is_available() else (_ for _ in ()).throw(
            RuntimeError("CUDA present"))


def test_static_step_and_sampling_never_read_tensors_back_to_the_host(monkeypatch):
    """What a CUDA graph cannot contain, caught on the CPU: any .item() / bool() / int() / .tolist() in the
    decode step, the sampler or the decode loop (EOS checks off) raises here."""
    from openjamba.inference import SamplingParams

    model = _model()
    gen = Generator(model, 2, 64, mode="static")
    tok = gen.prefill(torch.randint(0, 128, (2, 9))).argmax(-1)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside the decode loop")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = gen.decode_n_tokens(tok, 6, SamplingParams(0.7, top_k=40, top_p=0.9), torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert out.shape == (2, 6)


@pytest.mark.slow
def test_compiled_static_step_matches_eager():
    """torch.compile of the static step (what step="compiled" captures on CUDA); ~30 s of compilation on a CPU."""
    model = _model()
    ids = torch.randint(0, 128, (2, 12))
    eager = generate(model, ids, max_new_tokens=8, temperature=0, mode="eager")
    compiled = generate(model, ids, max_new_tokens=8, temperature=0, mode="static", moe_impl="dense", step="compiled")
    assert torch.equal(eager, compiled)


def test_bad_arguments_get_the_same_clear_errors_as_the_reference_generate():
    model = _model()
    ids = torch.randint(0, 128, (2, 6))
    right_padded = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1]])
    for call in (generate, reference_generate):
        with pytest.raises(ValueError, match="left padding only"):
            call(model, ids, right_padded, max_new_tokens=2)
        with pytest.raises(ValueError, match="pad_token_id"):
            call(model, ids, max_new_tokens=2, pad_token_id=-1)
        with pytest.raises(ValueError, match="seed"):
            call(model, ids, max_new_tokens=2, seed=[1])
        with pytest.raises(ValueError, match="top_p"):
            call(model, ids, max_new_tokens=2, temperature=1.0, top_p=1.5)
