"""Generation: greedy against a no-cache argmax loop, streaming, left-padded batches, EOS, sampling."""

import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.generation import Sampler, generate, stream


def tiny_model(seed=0, **overrides):
    """jamba-tiny (attention, Mamba, dense and MoE layers) with a sharpened lm_head: a random model's logits
    are nearly flat, so near-ties would make argmax comparisons fragile; scaling the head separates them."""
    torch.manual_seed(seed)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny", **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(lengths, seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


@torch.no_grad()
def argmax_loop(model, ids, steps):
    """The specification of greedy decoding: a full forward over the whole sequence for every token."""
    for _ in range(steps):
        nxt = model(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def test_greedy_matches_full_forward_argmax_loop(model):
    ids = torch.stack(prompts([6, 6]))
    out = model.generate(ids, max_new_tokens=10, temperature=0)
    assert out.shape == (2, 16) and out.dtype == torch.long
    assert torch.equal(out[:, :6], ids)
    assert torch.equal(out, argmax_loop(model, ids, 10))
    assert len(set(out[0, 6:].tolist())) > 2  # a non-degenerate continuation


def test_stream_yields_the_tokens_of_generate(model):
    ids = torch.stack(prompts([5, 5, 5], seed=2))
    for kw in (dict(temperature=0), dict(temperature=0.8, top_k=20, seed=7)):
        steps = list(stream(model, ids, max_new_tokens=7, **kw))
        assert len(steps) == 7 and all(s.shape == (3,) for s in steps)
        assert torch.equal(torch.stack(steps, 1), model.generate(ids, max_new_tokens=7, **kw)[:, 5:])


def test_stream_does_not_leak_grad_mode_and_outputs_are_trainable(model):
    it = model.generate_stream(torch.stack(prompts([4])), max_new_tokens=3, temperature=0)
    first = next(it)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert len(list(it)) == 2
    # Generated ids can go straight into a training step (no inference tensors).
    out = model.generate(torch.stack(prompts([4])), max_new_tokens=3, temperature=0)
    assert not out.is_inference() and not first.is_inference()
    model.zero_grad()
    model(out, labels=out).loss.backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad()


def test_left_padded_batch_equals_each_row_alone(model):
    rows = prompts([3, 9, 6, 1], seed=3)
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, temperature=0)
    assert out.shape == (4, 9 + 8)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=8, temperature=0)
        assert torch.equal(out[b, 9:], alone[0, len(r):]), f"row {b} differs from its solo generation"
        assert torch.equal(alone, argmax_loop(model, r[None], 8))


def test_left_padded_batch_with_per_row_seeds_equals_each_row_alone(model):
    rows = prompts([2, 7, 4], seed=4)
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    out = model.generate(ids, attention_mask=mask, seed=[11, 12, 13], **kw)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], seed=[11 + b], **kw)
        assert torch.equal(out[b, 7:], alone[0, len(r):])


def test_eos_pads_finished_rows_and_stops_when_all_finished(model):
    ids = torch.stack(prompts([5, 5], seed=9))
    free = model.generate(ids, max_new_tokens=12, temperature=0)[:, 5:]
    # An EOS that row 0 first produces at a step >= 2, so there is a visible prefix before it.
    step = next(i for i in range(2, 12) if free[0, i] not in free[0, :i])
    eos = int(free[0, step])
    out = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_id=eos, pad_token_id=1)[:, 5:]
    for b in range(2):
        hits = (free[b] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 12
        assert torch.equal(out[b, :end], free[b, :end])
        assert (out[b, end:] == 1).all()
    assert int(out[0, step]) == eos and (out[0, step + 1:] == 1).all()

    # Every row finished: generation stops right after the last EOS, and streaming stops too.
    both = sorted({int(free[0, step]), int(free[1, 3])})
    ends = [int((free[b][:, None] == torch.tensor(both)).any(1).nonzero()[0]) + 1 for b in range(2)]
    out = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_id=both)
    assert out.shape[1] == 5 + max(ends) < 5 + 12
    assert len(list(model.generate_stream(ids, max_new_tokens=12, temperature=0, eos_token_id=both))) == max(ends)
    assert (out[:, 5:] == model.config.pad_token_id).sum() == max(ends) - min(ends)


def test_early_stop_result_does_not_depend_on_how_often_eos_is_checked(model, monkeypatch):
    import openjamba.generation as generation

    ids = torch.stack(prompts([5, 5], seed=9))
    kw = dict(max_new_tokens=12, temperature=0, eos_token_id=[80, 71])
    every_step = model.generate(ids, **kw)
    assert every_step.shape[1] < 5 + 12  # stops early
    for n in (2, 5, 100):
        monkeypatch.setitem(generation.EOS_CHECK_EVERY, "cpu", n)
        assert torch.equal(model.generate(ids, **kw), every_step)


def test_seed_reproducibility(model):
    ids = torch.stack(prompts([4, 4], seed=6))
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = model.generate(ids, seed=123, **kw)
    assert torch.equal(a, model.generate(ids, seed=123, **kw))
    assert not torch.equal(a, model.generate(ids, seed=124, **kw))
    assert not torch.equal(a[0, 4:], a[1, 4:]) or not torch.equal(ids[0], ids[1])


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    ids = torch.stack(prompts([6, 6], seed=7))
    greedy = model.generate(ids, max_new_tokens=8, temperature=0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=1.5, top_k=1, seed=0), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=0), greedy)
    assert not torch.equal(model.generate(ids, max_new_tokens=8, temperature=1.5, seed=0), greedy)


def test_sampler_filters_and_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(Sampler(top_k=2).filter(logits)).tolist() == [[True, True, False, False]]
    # Nucleus: the smallest prefix whose mass reaches top_p.
    assert torch.isfinite(Sampler(top_p=0.8).filter(logits)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(Sampler(top_p=0.81).filter(logits)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(Sampler(top_p=1.0).filter(logits)).all()
    # The exponential-race draw samples the softmax distribution (and the filtered one renormalised).
    n = 40000
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(Sampler(generators=g)(logits.expand(n, 4)), minlength=4) / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)
    freq = torch.bincount(Sampler(top_k=2, generators=g)(logits.expand(n, 4)), minlength=4) / n
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)
    freq = torch.bincount(Sampler(temperature=0.5, generators=g)(logits.expand(n, 4)), minlength=4) / n
    sharp = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(freq, sharp / sharp.sum(), atol=0.01)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty prompt"),
    (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), ValueError, "empty prompt"),
    (dict(input_ids=torch.tensor([5, 6, 7])), ValueError, "2-D"),
    (dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), ValueError, "2-D"),
    (dict(input_ids=torch.ones(1, 3)), ValueError, "integer token ids"),
    (dict(input_ids=[[1, 2]]), TypeError, "torch.Tensor"),
    (dict(input_ids=torch.tensor([[1, 500]])), ValueError, "vocabulary"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=-3), ValueError, "max_new_tokens"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(attention_mask=torch.ones(1, 2, dtype=torch.long)), ValueError, "attention_mask shape"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "LEFT"),
    (dict(attention_mask=torch.tensor([[1, 0, 1]])), ValueError, "left padding"),
    (dict(seed=[1, 2]), ValueError, "seed"),
    (dict(eos_token_id=1000), ValueError, "eos_token_id"),
])
def test_bad_arguments_raise_clear_errors(model, kwargs, error, match):
    kw = dict(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    kw.update(kwargs)
    with pytest.raises(error, match=match):
        generate(model, **kw)
    with pytest.raises(error, match=match):
        stream(model, **kw)  # validated at the call, before the first step
