"""On-device sampling (seeded, reproducible) and the memory planner."""

import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.inference import (DoesNotFit, FusedDecodeStep, Generator, SamplingParams, check_fits, filter_logits,
                                 generate, max_batch, plan_memory, sample)
from openjamba.inference import fused


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    a = [sample(logits, p, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    draws = torch.stack([sample(logits, p, g) for g in [torch.Generator().manual_seed(3)] for _ in range(20)])
    assert len({tuple(d.tolist()) for d in draws}) > 1  # a generator advances: not the same draw forever


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    draws = sample(logits, SamplingParams(1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)


def test_top_k_top_p_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits, 2, None)
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()
    # probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two (0.64 < 0.7 before adding the second)
    kept = filter_logits(logits, None, 0.7)
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    assert sample(logits, SamplingParams(0.0)).item() == 0
    assert sample(logits, SamplingParams(5.0, top_k=1), torch.Generator().manual_seed(0)).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(1.0, top_p=1.5)


def test_generate_sampling_reproducible_and_row_seeds_batch_independent():
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny")).eval()
    ids = torch.randint(0, 128, (2, 6))
    kw = dict(max_new_tokens=15, temperature=1.0, top_p=0.95, mode="static")
    a = generate(model, ids, seed=11, **kw)
    b = generate(model, ids, seed=11, **kw)
    c = generate(model, ids, seed=12, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = generate(model, ids, seed=[5, 6], **kw)
    alone = generate(model, ids[1:], seed=[6], **kw)
    assert torch.equal(rows[1:], alone)


def test_plan_counts_the_cache_exactly():
    cfg = JambaConfig.from_name("jamba-1b")
    plan = plan_memory(cfg, torch.bfloat16, batch=2, context=100_000, chunk_size=4096)
    assert plan.kv_cache == cfg.kv_cache_bytes(100_000, 2, 2)
    assert plan.weights == cfg.param_counts()["total"] * 2
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    cache = model.new_cache(3, 50)
    p = plan_memory(model.config, torch.float32, 3, 50)
    assert p.kv_cache + p.mamba_state >= cache.nbytes()["total"]
    assert p.kv_cache == cache.nbytes()["kv"]


@pytest.mark.parametrize("fold", [False, True])
def test_plan_counts_the_fused_steps_weight_copies_at_one_row(fold, monkeypatch):
    """One row's fused step splits the Mamba mixers and holds a transposed copy of each out_proj (the same bytes as
    the model's own; jamba-1b: 14 x 2048 x 1024 bf16 = 56 MiB), and where routers are folded by default an fp32
    table (X, Di + H) for each MoE layer after a Mamba mixer (jamba-1b: 8 x 8 x 3072 x 4 bytes = 0.75 MiB), counted
    beside the weights: the bytes the step allocates."""
    monkeypatch.setattr(fused, "FOLD_DEFAULT", fold)
    cfg = JambaConfig.from_name("jamba-1b")
    one, two = (plan_memory(cfg, torch.bfloat16, batch=b, context=4096, chunk_size=1024) for b in (1, 2))
    assert one.step_copies == 14 * 2048 * 1024 * 2 + fold * 8 * 8 * 3072 * 4 and two.step_copies == 0
    assert f"fused step's weight copies {'56.75' if fold else '56.00'} MiB" in one.describe()
    tiny = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    plan = plan_memory(tiny.config, torch.float32, batch=1, context=64)
    step = FusedDecodeStep(tiny.to("cuda" if torch.cuda.is_available() else "cpu"), 1)
    assert len(step._folds) == 2 * fold
    assert plan.step_copies == (sum(copy.nbytes for copy, _ in step._copies.values())
                                + sum(table.nbytes for table, *_ in step._folds.values()))


def test_planner_refuses_with_the_numbers():
    cfg = JambaConfig.from_name("jamba-1b")
    plan = plan_memory(cfg, torch.bfloat16, batch=1, context=1_048_576, chunk_size=16384, budget=2 * 2 ** 30)
    assert not plan.fits
    with pytest.raises(DoesNotFit) as err:
        plan.check()
    msg = str(err.value)
    assert "2.00 GiB" in msg and "KV cache 2.00 GiB" in msg and "weights" in msg and "over by" in msg
    assert plan_memory(cfg, torch.bfloat16, 1, 1_048_576, 16384, budget=100 * 2 ** 30).fits
    # Prefill activations grow with the chunk, not with the context (bf16: flash takes grouped K/V).
    a = plan_memory(cfg, torch.bfloat16, 1, 65536, 4096).prefill_peak
    b = plan_memory(cfg, torch.bfloat16, 1, 1_048_576, 4096).prefill_peak
    assert b < 1.05 * a


def test_max_batch_and_generator_refusal():
    cfg = JambaConfig.from_name("jamba-1b")
    budget = 40 * 2 ** 30
    n = max_batch(cfg, torch.bfloat16, 131072, budget)
    assert n > 1
    assert plan_memory(cfg, torch.bfloat16, n, 131072, budget=budget).fits
    assert not plan_memory(cfg, torch.bfloat16, n + 1, 131072, budget=budget).fits
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    with pytest.raises(DoesNotFit, match="needs"):
        Generator(model, 1, 4096, mode="static", budget=1024)


def test_check_fits_counts_weights_before_loading():
    cfg = JambaConfig.from_name("jamba-1b")
    weights = cfg.param_counts()["total"] * 2
    with pytest.raises(DoesNotFit, match="weights 1.47 GiB"):
        check_fits(cfg, torch.bfloat16, 1, 4096, device="cpu", budget=weights)  # nothing left for the rest
    assert check_fits(cfg, torch.bfloat16, 1, 4096, device="cpu", budget=4 * weights).fits


def test_the_prefill_chunk_shrinks_to_fit_large_batches():
    """Left unset, the prefill chunk is the largest power of two up to 8192 tokens per row whose plan fits:
    jamba-1b at batch 256 x 128K on 139 GiB does not fit with 8192-token chunks (2M tokens of activations
    per chunk) and does with shorter ones; where nothing fits, the refusal says the chunk was the smallest
    tried. The Generator prefills in the chunk its plan chose, and the result is one full forward's."""
    cfg = JambaConfig.from_name("jamba-1b")
    budget, weights = 139 * 2 ** 30, cfg.param_counts()["total"] * 2
    assert not plan_memory(cfg, torch.bfloat16, 256, 131072, 8192, budget=budget).fits
    plan = plan_memory(cfg, torch.bfloat16, 256, 131072, budget=budget)
    chunk = plan.detail["chunk_size"]
    assert plan.fits and 64 <= chunk < 8192
    assert not plan_memory(cfg, torch.bfloat16, 256, 131072, 2 * chunk, budget=budget).fits  # the largest
    assert check_fits(cfg, torch.bfloat16, 256, 131072, device="cpu", budget=budget + weights).fits
    assert max_batch(cfg, torch.bfloat16, 131072, budget) > max_batch(cfg, torch.bfloat16, 131072, budget, 8192)
    assert plan_memory(cfg, torch.bfloat16, 1, 4096).detail["chunk_size"] == 4096  # no budget: the prompt
    with pytest.raises(DoesNotFit, match="the prefill chunk is already the smallest tried"):
        plan_memory(cfg, torch.bfloat16, 1, 4096, budget=weights).check()

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny")).eval()
    small = plan_memory(model.config, torch.float32, 3, 512, 128, weights_resident=False).total
    assert not plan_memory(model.config, torch.float32, 3, 512, 256, budget=small, weights_resident=False).fits
    gen = Generator(model, 3, 512, mode="static", budget=small)
    assert gen.chunk_size == 128
    ids = torch.randint(0, model.config.vocab_size, (3, 300))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    torch.testing.assert_close(gen.prefill(ids), full, rtol=1e-4, atol=1e-4)


def test_a_left_padded_prefill_is_planned_with_its_mask(caplog):
    """A left-padded batch materialises a (batch, chunk, context) mask per chunk, which the Generator's plan
    (made before any prompt is seen) leaves out: prefill plans again with it, takes a shorter chunk where
    the chunk was chosen (same logits as one full forward), and refuses a given chunk that does not fit
    before running anything."""
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny")).eval()
    cfg = model.config

    def total(chunk, padded):
        return plan_memory(cfg, torch.float32, 3, 512, chunk, padded=padded, weights_resident=False).total

    budget = total(128, False)
    assert total(128, True) > budget >= total(64, True)
    gen = Generator(model, 3, 512, mode="static", budget=budget)
    assert gen.chunk_size == 128
    ids = torch.randint(0, cfg.vocab_size, (3, 300))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :100] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[:, -1]
    with caplog.at_level("INFO", logger="openjamba.inference"):
        last = gen.prefill(ids, mask)
    assert "prefill chunk 64 tokens per row for a left-padded batch" in caplog.text
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-4)
    gen.reset()
    with pytest.raises(DoesNotFit, match=r"prefill peak .* \(chunk 128\)"):
        gen.prefill(ids, mask, chunk_size=128)
    fixed = Generator(model, 3, 512, mode="static", chunk_size=128, budget=budget)
    with pytest.raises(DoesNotFit, match="Reduce batch, context or chunk size"):
        fixed.prefill(ids, mask)
    assert fixed.cache.length == 0  # refused before any chunk ran
