"""The fused decoding step (Triton kernels: compiled on CUDA, the interpreter on the CPU) against the static
step it replaces."""

import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.bench.common import variant_configs
from openjamba.inference import FusedDecodeStep, Generator, generate
from openjamba.inference import fused
from openjamba.inference.fused import GEMV_MAX_ROWS
from openjamba.inference.step import decode_step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _model(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = JambaConfig.from_name("jamba-tiny", **overrides)
    model = JambaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, biases and SSM parameters: every input matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name.endswith(".D"):
                p.normal_(0.0, 0.5)
    return model.to(device=DEVICE, dtype=dtype)


def _compare(model, batch, steps, rtol, atol, fused=None, **options):
    """Teacher-forced steps through both; logits and every cache tensor compared after each step."""
    cfg = model.config
    ref_cache, cache = model.new_cache(batch, steps + 4), model.new_cache(batch, steps + 4)
    fused = fused or FusedDecodeStep(model, batch, **options)
    ids = torch.randint(0, cfg.vocab_size, (batch, steps), device=DEVICE)
    with torch.no_grad():
        for t in range(steps):
            want = decode_step(model, ids[:, t:t + 1], ref_cache, "dense")
            got = fused(model, ids[:, t:t + 1], cache)
            ref_cache.advance(1)
            cache.advance(1)
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    for name in ("conv", "ssm", "key", "value"):
        for i, ref in getattr(ref_cache, name).items():
            torch.testing.assert_close(getattr(cache, name)[i].float(), ref.float(), rtol=rtol, atol=atol)
    assert int(cache.pos) == steps


@pytest.mark.parametrize("overrides", [
    {},  # Mamba + attention, MoE every other layer, top-2 of 4
    dict(mamba_proj_bias=True, mamba_conv_bias=False, num_experts_per_tok=1),
    dict(expert_layer_period=1, expert_layer_offset=0, num_experts=3, mamba_d_state=5, mamba_dt_rank=3),
    dict(num_experts=1, num_experts_per_tok=1, hidden_size=40, intermediate_size=72, mamba_d_conv=3,
         tie_word_embeddings=True),
])
@pytest.mark.parametrize("batch", [1, 3])  # one row: MoE experts by slot (top-1, top-2 of 3 and of 4)
def test_fused_step_equals_static_step_fp32(overrides, batch):
    _compare(_model(**overrides), batch=batch, steps=5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, GEMV_MAX_ROWS + 2])  # the GEMV form and the tensor-core form
def test_both_matmul_forms_equal_static_step_fp32(batch):
    _compare(_model(mamba_proj_bias=True), batch=batch, steps=3, rtol=1e-5, atol=1e-5)


def test_batches_above_one_row_tile_run_as_row_blocks_fp32(monkeypatch):
    """Rows past one program's row tile run as row blocks (here 16 rows per block: 40 rows are blocks of
    16, 16 and 8), every kernel's rows offset by its block, MoE experts picked per block."""
    monkeypatch.setattr(fused, "ROW_BLOCK", 16)
    model = _model()
    step = FusedDecodeStep(model, 40)
    assert (step.BB, step.NRB) == (16, 3)
    _compare(model, batch=40, steps=3, rtol=1e-5, atol=1e-5)


def test_large_batch_tiles_fp32(monkeypatch):
    """The tiles of batches past 64 and 128 rows (WIDE_TILES: wider mamba_in blocks, so fewer x_proj
    partial sums; wider expert and down tiles), here taken up from 16 and 32 rows, in row blocks of 16."""
    monkeypatch.setattr(fused, "ROW_BLOCK", 16)
    monkeypatch.setattr(fused, "WIDE_TILES", tuple((rows // 4, t) for rows, t in fused.WIDE_TILES))
    model = _model()
    step = FusedDecodeStep(model, 40)
    want = fused.default_tiles(1000)
    assert step.tiles == want and want["mamba_in"] != fused.TILES["mamba_in"][1]
    assert step.NP == -(-model.config.mamba_inner_size // want["mamba_in"]["BD"])
    _compare(model, batch=40, steps=3, rtol=1e-5, atol=1e-5)


def test_default_tiles_by_batch():
    dot = {k: v[1] for k, v in fused.TILES.items()}
    assert fused.default_tiles(1) == {k: v[0] for k, v in fused.TILES.items()}
    assert fused.default_tiles(1, pack=False) == {**fused.default_tiles(1), **fused.ELEMENT_TILES}
    assert FusedDecodeStep(_model(), 1).tiles == fused.default_tiles(1, pack=False)  # fp32: elements
    assert fused.default_tiles(64) == dot
    assert fused.default_tiles(65) == {**dot, **fused.WIDE_TILES[0][1]}
    assert fused.default_tiles(129) == {**dot, **fused.WIDE_TILES[0][1], **fused.WIDE_TILES[1][1]}


def test_auto_takes_the_fused_step_for_large_batches_only_where_the_cache_dominates():
    """step="auto": fused up to AUTO_ROWS rows at any context (H200: faster than static at every batch up to
    256, the closest jamba-1b at 1K context: 4.02 vs 4.57 ms); above it, fused only where the attention cache
    is long enough for its batch (never for a model without attention). The rule picks the faster step at
    each point measured on an H200 for jamba-1b (benchmarks/results/auto_rule/, cache of 2x the context)."""
    cfg = JambaConfig.from_name("jamba-1b")
    mamba = JambaConfig.from_name("jamba-1b", attn_layer_period=17, attn_layer_offset=16)
    assert fused.AUTO_ROWS == 256
    assert fused.fused_preferred(cfg, 256, 1024, 2) is None
    assert fused.fused_preferred(mamba, 256, 1 << 20, 2) is None
    assert fused.fused_preferred(cfg, 512, 32768, 2) is None
    assert "batch 512 is above 256 rows" in fused.fused_preferred(cfg, 512, 1100, 2)
    # (batch, cache positions): the faster step measured
    measured = {(384, 2048): "static", (384, 4096): "fused", (384, 8192): "fused", (384, 16384): "fused",
                (512, 2048): "static", (512, 4096): "static", (512, 8192): "fused", (512, 16384): "fused",
                (768, 2048): "static", (768, 16384): "fused"}
    for (batch, length), faster in measured.items():
        assert (fused.fused_preferred(cfg, batch, length, 2) is None) == (faster == "fused"), (batch, length)
    for batch in (384, 512):
        assert fused.fused_preferred(mamba, batch, 2048, 2) is not None  # measured: static 26% / 39% faster
    transformer = variant_configs(cfg, ["transformer"])["transformer"]
    for batch in (384, 512):
        assert fused.fused_preferred(transformer, batch, 2048, 2) is None  # measured: fused 2.4x faster
    assert "attention cache (0.0 GiB)" in fused.fused_preferred(mamba, 512, 1 << 20, 2)


def test_full_cache_is_not_written_past_its_end():
    """The fused step writes K/V itself at the device position: at a full cache it writes nothing and
    attends over the cache's positions only (the Generator refuses the step on the host before that)."""
    model = _model()
    cache = model.new_cache(1, 4)
    cache.length = 4
    cache.sync_position()
    # a write at position 4 of a 4-position cache would land in the next KV head's first position
    before = {i: (k.clone(), cache.value[i].clone()) for i, k in cache.key.items()}
    with torch.no_grad():
        FusedDecodeStep(model, 1)(model, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), cache)
    for i, (k, v) in before.items():
        assert torch.equal(cache.key[i], k) and torch.equal(cache.value[i], v)
    with pytest.raises(RuntimeError, match="cache holds 4 of 4 positions"):
        Generator(model, 1, 4, mode="static", step="fused").decode_n_tokens(torch.zeros(1, dtype=torch.long,
                                                                                        device=DEVICE), 5)


def test_full_cache_reads_no_position_past_its_end():
    """At a full cache the split kernel reads positions [0, L) only. Each head's keys and values here sit in
    a buffer whose positions past L hold NaN (and the padding mask's say "valid"): one read past the end
    would make the logits NaN."""
    model = _model()
    L = 4
    cache = model.new_cache(1, L)
    torch.manual_seed(1)
    for store in (cache.key, cache.value):
        for i, t in store.items():
            buf = torch.full((t.shape[0], t.shape[1], L + 64, t.shape[3]), float("nan"), device=DEVICE)
            buf[:, :, :L] = torch.randn_like(t)
            store[i] = buf[:, :, :L]
    mask = torch.ones(1, L + 64, dtype=torch.bool, device=DEVICE)
    cache.key_mask = mask[:, :L]
    cache.length = L
    cache.sync_position()
    with torch.no_grad():
        logits = FusedDecodeStep(model, 1)(model, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), cache)
    assert torch.isfinite(logits).all()


def test_x_proj_partials_reduced_in_slices_fp32():
    """Wide models reduce the x_proj partial sums a slice at a time (here 2 at a time of 4: batch 1 takes
    the GEMV tiles, 16 channels per mamba_in program, so d_inner 64 gives 4 partials)."""
    assert FusedDecodeStep(_model(), 1).NP == 4
    _compare(_model(), batch=1, steps=3, rtol=1e-5, atol=1e-5, tiles={"mamba_ssm": {"BP": 2}})


@pytest.mark.parametrize("slots, rows", [(3, 3), (8, 4)])  # fewer rows than mamba_in's 4 channel blocks (so some
def test_x_proj_summed_into_rows_by_atomic_adds_fp32(slots, rows):  # take two adds); more, capped at one per block
    """Split Mamba mixers with XS: each mamba_in block adds its x_proj share into one of XS rows (the mixer's own,
    zeroed with the step) and mamba_ssm sums those rows, not one partial per block."""
    model = _model()
    step = FusedDecodeStep(model, 1, tiles={"mamba_in": {"XS": slots}})
    n_mamba = sum(not layer.is_attention for layer in model.model.layers)
    assert step.XS == rows and step.NP == 4 and tuple(step.xsums.shape) == (n_mamba, rows, step.NX)
    _compare(model, batch=1, steps=3, rtol=1e-5, atol=1e-5, fused=step)
    assert bool((step.xsums != 0).all())  # every row was added to
    assert FusedDecodeStep(model, 1, tiles={"mamba_in": {"XS": slots}}, split=False).XS == 0  # split steps only
    assert fused.default_tiles(1)["mamba_in"]["XS"] == 16 and "XS" not in fused.default_tiles(1, pack=False)["mamba_in"]


@pytest.mark.parametrize("batch", [1, 2])  # split layers (fp32 sums of the split projections) and the dot form
def test_fused_step_follows_static_step_bf16(batch):
    """Rounded where the modules round: within a couple of bf16 steps of the static step."""
    _compare(_model(torch.bfloat16), batch=batch, steps=4, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("overrides, split", [
    ({}, None),
    (dict(mamba_proj_bias=True, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=0), False),
])
def test_packed_words_follow_static_step_and_element_form_bf16(overrides, split):
    """One row of a bf16 model reads the weights as int32 words of two bf16 (pack, on by default there): the
    same roundings as the static step and the same products as the element form in another order. Reduction
    tiles of 16 elements make every GEMV loop over several word tiles, the last ones partly past the row (the
    default tiles: test_fused_step_follows_static_step_bf16 and the comparison with the element form below)."""
    model = _model(torch.bfloat16, **overrides)
    small = {"norm_linear": {"BK": 16}, "mamba_in": {"BK": 16}, "ffn_up": {"BK": 16}, "down": {"BF": 32},
             "down_moe": {"BF": 32}, "mamba_out": {"BH": 16}}  # (the split out_proj in blocks of 16 outputs)
    step = FusedDecodeStep(model, 1, tiles=small, split=split)
    assert step.pack
    _compare(model, batch=1, steps=2, rtol=2e-2, atol=2e-2, fused=step)
    ids = torch.randint(0, model.config.vocab_size, (1, 2), device=DEVICE)
    logits = []
    for pack in (True, False):
        cache, step = model.new_cache(1, 8), FusedDecodeStep(model, 1, split=split, pack=pack)
        assert step.tiles["ffn_up"] == (fused.TILES["ffn_up"][0] if pack else fused.ELEMENT_TILES["ffn_up"])
        with torch.no_grad():
            logits.append(torch.cat([step(model, ids[:, t:t + 1], cache) for t in range(2)]).float())
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-2, atol=1e-2)


def test_packed_words_only_where_they_can_run():
    bf16, odd = _model(torch.bfloat16), _model(torch.bfloat16, hidden_size=40, intermediate_size=72)
    assert not FusedDecodeStep(bf16, 2).pack and not FusedDecodeStep(_model(), 1).pack
    assert not FusedDecodeStep(odd, 1).pack
    for model, batch, why in ((bf16, 2, "batch 2: packed words are a one-row GEMV form"),
                              (_model(), 1, r"dtype torch.float32 \(packed words hold two bf16\)"),
                              (odd, 1, "hidden_size 40 is not a multiple of 16")):
        with pytest.raises(RuntimeError, match="packed-word GEMVs were requested but cannot be used: " + why):
            FusedDecodeStep(model, batch, pack=True)
    _compare(odd, batch=1, steps=2, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("overrides", [{}, dict(expert_layer_period=1, expert_layer_offset=0, mamba_proj_bias=True)])
def test_one_row_without_split_layers_fp32(overrides):
    """One row takes split layers by default (a layer's last projection summed by atomic adds); the kernel
    chain they replace (a down_residual kernel per layer) still runs on request."""
    model = _model(**overrides)
    assert FusedDecodeStep(model, 1).split and not FusedDecodeStep(model, 1, split=False).split
    _compare(model, batch=1, steps=4, rtol=1e-5, atol=1e-5, split=False)


def test_split_layers_follow_weights_changed_in_place_fp32():
    """Split layers read transposed copies of their last projections (out_proj, down), made with the step; a
    weight changed in place afterwards (a training step, a checkpoint loaded into the model) is copied again
    before the next step."""
    model = _model()
    fused = FusedDecodeStep(model, 1, split=True)
    assert len(fused._copies) == 7  # 3 Mamba out_proj, 2 MLP down projections, 2 MoE layers' expert down ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj" in name or "down_proj" in name:
                p.mul_(-1.5)
    _compare(model, batch=1, steps=2, rtol=1e-5, atol=1e-5, fused=fused)
    assert fused.sync_copies() == 0
    out_proj = model.model.layers[0].mamba.out_proj
    out_proj.weight.data = out_proj.weight.data * 0.5  # new storage, same version counter
    assert fused.sync_copies() == 1
    _compare(model, batch=1, steps=2, rtol=1e-5, atol=1e-5, fused=fused)


def test_split_layers_are_one_row_only_and_off_under_deterministic_algorithms():
    model = _model()
    assert not FusedDecodeStep(model, 3).split
    with pytest.raises(ValueError, match="split layers run one row only"):
        FusedDecodeStep(model, 3, split=True)
    torch.use_deterministic_algorithms(True)
    try:
        assert not FusedDecodeStep(model, 1).split  # atomics add in no fixed order
        assert FusedDecodeStep(model, 1, split=True).split
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("split", [True, {"mamba"}, {"mamba", "mlp"}, {"mlp", "moe"}, {"moe"}])
def test_split_layers_pass_pending_outputs_through_every_kernel_fp32(split):
    """Layer kinds in every order, split or not: attention after a split layer (its qkv and o_proj read the
    pending output), a split Mamba mixer straight after a split MoE, the router, ffn_up and down_residual of
    an unsplit MLP or MoE after a split layer, a folded router whose mixer's input is pending (split Mamba and MLP),
    and the lm_head after the last."""
    model = _model(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=3, expert_layer_offset=1,
                   num_hidden_layers=6)
    kinds = [(layer.is_attention, layer.is_moe) for layer in model.model.layers]
    assert (True, False) in kinds and (False, True) in kinds and (True, True) in kinds
    _decisive_routers(model)
    fold = split is not True and "mamba" in split and "moe" not in split  # routers folded where they can be
    _compare(model, batch=1, steps=3, rtol=1e-5, atol=1e-5, split=split, fold_router=fold or None)
    with pytest.raises(ValueError, match=r"unknown layer kinds \['attention'\]"):
        FusedDecodeStep(model, 1, split={"attention", "mamba"})


class _Launches:
    """Stands in for the kernels module of a FusedDecodeStep and counts the launches of each kernel."""

    def __init__(self, fk):
        self.fk, self.count = fk, {}

    def __getattr__(self, name):
        kernel = getattr(self.fk, name)
        if not name.endswith("_kernel"):
            return kernel
        count = self.count

        class Launch:
            def __getitem__(self, grid):
                count[name] = count.get(name, 0) + 1
                return kernel[grid]
        return Launch()


def _decisive_routers(model, scale=30.0):
    """The model with its router weights scaled up: routing weights far from uniform, so that every term of the
    router logits shows in the output."""
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.feed_forward.router.weight.mul_(scale)
    return model


def test_router_folded_into_the_mamba_mixer_fp32():
    """One row with split Mamba mixers and fold_router: a MoE layer after one takes its routing from logits that the
    mixer's mamba_ssm adds up by linearity, and no router kernel runs; the same logits and caches as the static step
    and as the router kernel, also after the router's, its norm's and out_proj's weights change in place (the tables
    are made again), with an out_proj bias and top-1, and in bf16 (packed words)."""
    model = _decisive_routers(_model())
    folded = [i for i, layer in enumerate(model.model.layers) if layer.is_moe and not layer.is_attention]
    assert sorted(FusedDecodeStep(model, 1)._folds) == folded  # by default (fused.FOLD_DEFAULT)
    step = FusedDecodeStep(model, 1, fold_router=True)
    assert sorted(step._folds) == folded and len(folded) == 2
    step.fk = _Launches(step.fk)
    _compare(model, batch=1, steps=3, rtol=1e-5, atol=1e-5, fused=step)
    assert "router_kernel" not in step.fk.count and step.fk.count["ffn_up_kernel"] == 3 * 4
    kept = FusedDecodeStep(model, 1, fold_router=False)
    assert not kept._folds
    kept.fk = _Launches(kept.fk)
    _compare(model, batch=1, steps=2, rtol=1e-5, atol=1e-5, fused=kept)
    assert kept.fk.count["router_kernel"] == 2 * len(folded)
    with torch.no_grad():
        for i in folded:
            layer = model.model.layers[i]
            layer.feed_forward.router.weight.mul_(-3.0)
            layer.pre_ff_layernorm.weight.add_(0.25)
            layer.mamba.out_proj.weight.mul_(0.5)
    _compare(model, batch=1, steps=2, rtol=1e-5, atol=1e-5, fused=step)
    assert step.sync_copies() == 0
    for batch, options in ((3, {}), (1, dict(split=False)), (1, dict(split={"mamba", "moe"}))):
        with pytest.raises(RuntimeError, match="a folded router was requested but no layer can take one"):
            FusedDecodeStep(model, batch, fold_router=True, **options)
    biased = _decisive_routers(_model(mamba_proj_bias=True, num_experts_per_tok=1))
    _compare(biased, batch=1, steps=2, rtol=1e-5, atol=1e-5, fold_router=True)
    model = _model(torch.bfloat16)
    bf16 = FusedDecodeStep(model, 1, fold_router=True)
    assert bf16.pack and bf16._folds
    _compare(model, batch=1, steps=3, rtol=2e-2, atol=2e-2, fused=bf16)


def test_generator_fused_greedy_tokens_equal_static():
    model = _model()
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    static = generate(model, ids, max_new_tokens=6, temperature=0, mode="static", step="static")
    fused = generate(model, ids, max_new_tokens=6, temperature=0, mode="static", step="fused")
    assert torch.equal(static, fused)


@pytest.mark.parametrize("V", [100, 64])
def test_next_token_kernel_takes_torch_argmax_and_feeds_the_next_step(V):
    """The greedy token is torch.argmax's (the first of tied largest logits, across the kernel's blocks and loop
    iterations; a row of -inf gives 0), except that a NaN logit is passed over (argmax would pick it); its
    embedding row becomes the next input, the position moves on by one and the accumulators are zeroed (BZ
    elements per program, NZ not a multiple)."""
    from openjamba.inference import fused_kernels as fk

    torch.manual_seed(0)
    logits = torch.randint(-4, 3, (4, V), device=DEVICE).to(torch.bfloat16)  # many ties
    logits[1, [7, V - 1]] = 9.0  # the largest twice: the first wins
    logits[2] = float("-inf")
    logits[3, [4, 20]] = float("nan")  # lane 4 of the kernel's first two blocks of 16
    logits[3, 36] = 9.0  # the largest, in lane 4 of the third block: behind those NaNs
    emb = torch.randn(V, 24, device=DEVICE)
    h = torch.zeros(4, 24, device=DEVICE)
    tok = torch.full((4, 2), -1, dtype=torch.long, device=DEVICE)
    pos = torch.tensor([5], device=DEVICE)
    z = torch.ones(10, device=DEVICE)
    fk.next_token_kernel[(4 + 3,)](logits, logits.stride(0), V, emb, h, h.stride(0), 24, tok[:, 1], tok.stride(0), pos,
                                   z, 10, 4, BV=16, BH=16, BZ=4, PDL=False)
    want = logits.argmax(-1)
    assert want.tolist()[1:] == [7, 0, 4]  # torch.argmax picks row 3's first NaN
    want[3] = 36
    assert torch.equal(tok[:, 1], want) and (tok[:, 0] == -1).all()
    assert torch.equal(h, emb[want]) and int(pos) == 6 and not z.any()


@pytest.mark.parametrize("step, batch", [("fused", 1), ("static", 2)])
def test_greedy_blocks_equal_step_by_step_decoding(step, batch):
    """Greedy decoding in blocks (with the fused step each token ends in next_token_kernel, which feeds the token
    back, zeroes the split layers' accumulators and moves the position; the first layer here is attention, which
    reads that position) gives the tokens of the step-by-step loop, across calls that start with a block, end with
    a single step and start again, and with an EOS inside a block."""
    model = _model(attn_layer_offset=0)
    ids = torch.randint(0, 128, (batch, 5), device=DEVICE)
    runs = []
    for chain in (0, 2):
        gen = Generator(model, batch, 32, mode="static", step=step, chain=chain)
        tok = gen.prefill(ids).argmax(-1)
        parts = []
        for n in (3, 1, 2):  # a block and a step; a step; a block
            parts.append(gen.decode_n_tokens(tok, n, check_every=8))
            tok = parts[-1][:, -1]
        assert gen.cache.length == 5 + 6 and int(gen.cache.pos) == 5 + 6
        with pytest.raises(ValueError, match="check_every must be an int >= 1"):
            gen.decode_n_tokens(tok, 2, check_every=0)
        free = torch.cat(parts, 1)
        gen.reset()
        tok = gen.prefill(ids).argmax(-1)
        eos = torch.tensor([int((runs[0][0] if runs else free)[0, 1])], device=DEVICE)  # the first block's second
        runs.append((free, gen.decode_n_tokens(tok, 4, eos_ids=eos, pad_token_id=7, check_every=8)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    first = runs[0][0][0].tolist().index(int(eos))
    assert runs[1][1][0, first] == eos and (runs[1][1][0, first + 1:] == 7).all()


def test_fused_step_is_chosen_visibly_and_refused_clearly(monkeypatch):
    model = _model()
    assert Generator(model, 2, 16, mode="static", step="fused").step == "fused"
    assert Generator(model, 2, 16, mode="static").step == ("fused" if CUDA else "static")  # auto: fused on CUDA
    monkeypatch.setattr(fused, "AUTO_ROWS", 1)  # 2 rows above it, and a cache far smaller than the weights
    assert Generator(model, 2, 16, mode="static").step == "static"
    assert Generator(model, 2, 16, mode="static", step="fused").step == "fused"  # asked for: taken
    monkeypatch.undo()
    assert "batch 65536 is above the fused step's 65535 rows" in fused.fused_unavailable(model, 65536)
    wide = _model(intermediate_size=8200)  # 4 experts x 65535 rows x 8200 is past 2^31
    assert "MoE activations (2149548000 elements) are past the kernels' 32-bit offsets" in \
        fused.fused_unavailable(wide, 65535)
    assert fused.fused_unavailable(model, 65535) is None
    monkeypatch.setattr(fused, "MAX_BATCH", 8)
    with pytest.raises(RuntimeError, match="batch 9 is above"):
        Generator(model, 9, 16, mode="static", step="fused")
    with pytest.raises(ValueError, match="moe_impl"):
        Generator(model, 2, 16, mode="static", step="fused", moe_impl="dense")
    with pytest.raises(ValueError, match="use mode 'static' or 'graph'"):
        Generator(model, 2, 16, mode="eager", step="fused")
    with pytest.raises(ValueError, match="unknown step"):
        Generator(model, 2, 16, mode="static", step="fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="fused kernels run on CUDA"):
        Generator(model.cpu(), 2, 16, mode="static", step="fused")
    step = FusedDecodeStep.__new__(FusedDecodeStep)
    step.B = 2
    with pytest.raises(ValueError, match="built for batch 2"):
        step(model, torch.zeros(3, 1, dtype=torch.long), None)


def test_programmatic_dependent_launch_is_refused_where_it_cannot_run():
    model = _model()
    if CUDA and torch.cuda.get_device_capability()[0] >= 9:
        assert FusedDecodeStep(model, 1).pdl  # on by default for the GEMV form where the GPU has it
        assert not FusedDecodeStep(model, GEMV_MAX_ROWS + 1).pdl
        _compare(model, batch=2, steps=3, rtol=1e-5, atol=1e-5, pdl=True)  # and on request
    else:
        assert not FusedDecodeStep(model, 1).pdl
        with pytest.raises(RuntimeError, match="programmatic dependent launch .* cannot be used: .*(cpu|capability)"):
            FusedDecodeStep(model, 1, pdl=True)


@pytest.mark.parametrize("B, T, max_length", [(2, 600, 1100), (1, 300, 4000)])
def test_fused_attention_over_splits_and_left_padding_fp32(B, T, max_length):
    """A long left-padded prompt: flash-decoding splits (the filled positions cut into blocks of 64, the
    last split partly filled; in a cache allocated far past the prompt, some splits empty) and masked keys,
    against the static step's softmax over the whole buffer."""
    model = _model()
    ids = torch.randint(0, 128, (B, T), device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[-1, :77] = 0
    gens = [Generator(model, B, max_length, mode="static", step=s) for s in ("static", "fused")]
    assert gens[1]._step._splits(gens[1].cache, model.config.num_key_value_heads) >= 2
    first = [g.prefill(ids, mask) for g in gens]
    torch.testing.assert_close(first[1], first[0])
    feed = torch.randint(0, 128, (B, 3), device=DEVICE)
    for t in range(feed.shape[1]):
        want, got = (g.decode_one_token(feed[:, t]) for g in gens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weights_the_kernels_cannot_index_are_refused_by_name():
    model = _model()
    experts = model.model.layers[1].feed_forward.experts
    experts.gate_up_proj.data = experts.gate_up_proj.data.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(RuntimeError, match="layers.1.feed_forward.experts.gate_up_proj is not contiguous"):
        Generator(model, 2, 16, mode="static", step="fused")
    model = _model()
    model.model.layers[0].mamba.A_log.data = model.model.layers[0].mamba.A_log.data.double()
    with pytest.raises(RuntimeError, match="layers.0.mamba.A_log is torch.float64"):
        Generator(model, 2, 16, mode="static", step="fused")
