"""Where a decode step's time goes: the three step kinds side by side, and the fused step's kernels.

    python benchmarks/bench_decode_step.py                  # jamba-1b, bf16, batches 1 and 16, context 1024
    python benchmarks/bench_decode_step.py --sweep          # also sweep the fused kernels' tiles at batch 1
                                                            # (with split layers, and the kernel chain without)
    python benchmarks/bench_decode_step.py --sweep-rows 128,256   # sweep the tensor-core tiles at these batches
    python benchmarks/bench_decode_step.py --batches 1 --steps fused --no-profile --split-kinds
                                                            # batch 1: which layer kinds to split
    python benchmarks/bench_decode_step.py --batches 1 --steps fused --no-profile --chain-floor
                                                            # batch 1: the same kernels at tiny widths
    python benchmarks/bench_decode_step.py --batches 1 --steps fused --no-profile --pack
                                                            # batch 1: packed-word GEMVs against elements
    python benchmarks/bench_decode_step.py --batches 1 --steps fused --no-profile --fold-router
                                                            # batch 1: folded routers against router kernels
    python benchmarks/bench_decode_step.py --batches 1 --steps fused --no-profile --greedy-blocks
                                                            # greedy decoding in blocks against token by token
    python benchmarks/bench_decode_step.py --batches 384,512 --steps fused,static --no-profile --variant mamba
                                                            # step kinds only, the pure Mamba model of the same size

For each batch: the graph-replayed milliseconds per token of the fused, static and compiled steps
(measured one after another on the same model and cache size; the Generator's step with its greedy
pick), the fused step's graph alone with and without programmatic dependent launch (PDL), and one
torch.profiler pass over the fused step launched eagerly (kernels per token, GPU time per kernel), and at
batch 1 the graph alone with the default split layers and with the kernel chain they replace.
--chain-floor times, at batch 1, the graph alone of the model and of the same layer schedule at tiny widths
(TINY_WIDTHS: the same kernels, under 2 MB of weights per token), so the difference is what the weight bytes
add to the chain of dependent kernels.
--pack times, at batch 1, the graph alone with the GEMVs reading packed int32 words (`pack`, the default for bf16)
and reading bf16 elements, three rounds in turn. --fold-router does the same with the MoE routers folded into the
Mamba mixers before them (`fold_router`, the default) and with router kernels.
--greedy-blocks times greedy decoding as generation runs it (`Generator.decode_n_tokens`, 64 tokens per call, the
fused step) in blocks of engine.CHAIN tokens per graph replay (next_token_kernel feeding each token back) and token
by token (`chain=0`: the one-token graph, the argmax and the copies per token), three rounds in turn, at each batch.
--sweep times the fused step with each candidate tile configuration of one kernel family at a time
(coordinate descent from the defaults in inference/fused.py) and reports the best; the defaults there
come from such sweeps. --sweep-rows does the same for the tensor-core tiles at large batches
(fused.WIDE_TILES come from such a sweep). Each sweep also times the static step at its batch.
Writes benchmarks/results/decode_step_profile.json (or --out). Needs CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from openjamba.bench.common import VARIANTS, build_model, machine, profile_kernels, variant_configs
from openjamba.config import JambaConfig
from openjamba.inference import FusedDecodeStep, Generator
from openjamba.inference.engine import CHAIN, capture_step
from openjamba.inference.fused import SPLIT_KINDS

# candidate tiles per kernel family for one row (the GEMV form, packed words for bf16), swept in this order; the
# first of each is the default
GEMV_CANDIDATES = {
    "ffn_up": [dict(BF=16, BK=1024, warps=8), dict(BF=32, BK=1024, warps=8), dict(BF=32, BK=1024, warps=16),
               dict(BF=16, BK=1024, warps=4), dict(BF=8, BK=1024, warps=4), dict(BF=2, BK=1024, warps=1)],
    "down_moe": [dict(BH=4, BF=4096, warps=4), dict(BH=8, BF=4096, warps=8),
                 dict(BH=4, BF=4096, warps=8), dict(BH=2, BF=4096, warps=4), dict(BH=2, BF=2048, warps=4)],
    "down": [dict(BH=4, BF=4096, warps=4), dict(BH=8, BF=4096, warps=4), dict(BH=8, BF=4096, warps=8),
             dict(BH=16, BF=4096, warps=8), dict(BH=2, BF=4096, warps=4), dict(BH=4, BF=2048, warps=4)],
    "mamba_in": [dict(BD=16, BK=1024, warps=8, XS=16), dict(BD=16, BK=1024, warps=4, XS=16),
                 dict(BD=32, BK=1024, warps=8, XS=16), dict(BD=8, BK=1024, warps=4, XS=16),
                 dict(BD=16, BK=1024, warps=8, XS=32), dict(BD=16, BK=1024, warps=8, XS=0)],
    "norm_linear": [dict(BN=4, BK=1024, warps=4), dict(BN=8, BK=1024, warps=4), dict(BN=16, BK=1024, warps=8),
                    dict(BN=32, BK=1024, warps=8), dict(BN=4, BK=1024, warps=2)],
    "mamba_ssm": [dict(BD=16, warps=4), dict(BD=32, warps=4), dict(BD=16, warps=2), dict(BD=8, warps=2)],
    "ffn_split": [dict(BF=8, BK=1024, BH=1024, warps=4), dict(BF=8, BK=1024, BH=256, warps=4),
                  dict(BF=16, BK=1024, BH=1024, warps=8), dict(BF=8, BK=1024, BH=1024, warps=8),
                  dict(BF=4, BK=1024, BH=1024, warps=4)],
    "mamba_out": [dict(BD=16, BH=1024, warps=4), dict(BD=16, BH=1024, warps=8), dict(BD=16, BH=512, warps=4),
                  dict(BD=32, BH=512, warps=8), dict(BD=8, BH=1024, warps=2)],
}
# the families only split layers use (ffn_split: the MLP and MoE split, not the default) and those the split
# Mamba mixer leaves unused
SPLIT_ONLY = ("ffn_split", "mamba_out")
UNUSED_WITH_SPLIT = ("mamba_ssm",)  # (its x_proj partials tile BP is still read, but not swept)
# candidate tensor-core tiles per kernel family for batches past one row block; the first of each is the
# dot column of fused.TILES
DOT_CANDIDATES = {
    "down": [dict(BH=16, BF=512, warps=4), dict(BH=64, BF=128, warps=4), dict(BH=64, BF=128, warps=8),
             dict(BH=128, BF=64, warps=8), dict(BH=32, BF=256, warps=4), dict(BH=128, BF=128, warps=8)],
    "down_moe": [dict(BH=16, BF=512, warps=4), dict(BH=64, BF=128, warps=4), dict(BH=64, BF=128, warps=8),
                 dict(BH=128, BF=64, warps=8), dict(BH=32, BF=256, warps=4)],
    "ffn_up": [dict(BF=64, BK=128, warps=4), dict(BF=128, BK=64, warps=8), dict(BF=64, BK=64, warps=8),
               dict(BF=32, BK=128, warps=4), dict(BF=128, BK=128, warps=8)],
    "norm_linear": [dict(BN=64, BK=128, warps=4), dict(BN=128, BK=64, warps=8), dict(BN=64, BK=64, warps=8),
                    dict(BN=128, BK=128, warps=8)],
    "mamba_in": [dict(BD=32, BK=128, warps=4), dict(BD=64, BK=128, warps=4), dict(BD=64, BK=64, warps=8),
                 dict(BD=128, BK=64, warps=8)],
}


# widths at which a model's active weights are under 2 MB (jamba-1b: 1.7 MB, 0.4 us at 4.27 TB/s): its fused step
# then times the chain of dependent kernels alone
TINY_WIDTHS = dict(hidden_size=64, intermediate_size=64, vocab_size=256, num_attention_heads=4,
                   num_key_value_heads=1, mamba_dt_rank=8)


def _at_context(cache, context: int):
    """A synthetic context: the cache's length and device position set without a prefill."""
    cache.length = context
    cache.sync_position()


def _ms_per_call(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def graph_ms(model, batch: int, step: str, context: int, reps: int = 100) -> float:
    """Graph-replayed ms per token of one Generator step kind at a synthetic context."""
    gc.collect()  # the previous call's Generator (graph, cache) is freed before the memory plan reads free memory
    torch.cuda.empty_cache()
    gen = Generator(model, batch, 2 * context, mode="graph", step=step)  # the plan picks a prefill chunk that fits
    _at_context(gen.cache, context)
    tok = torch.zeros(batch, dtype=torch.long, device=model.device)
    return _ms_per_call(lambda: tok.copy_(gen.decode_one_token(tok).argmax(-1)), reps)  # greedy, as decoding


def fused_graph_ms(model, batch: int, context: int, tiles=None, reps: int = 60, **options) -> float:
    """The replayed graph of one FusedDecodeStep (explicit tiles; options: PDL on or off, split layers or not)
    alone, ms per token."""
    cache = model.new_cache(batch, 2 * context)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    graph, _ = capture_step(FusedDecodeStep(model, batch, tiles, **options), model, tok, cache, None)
    _at_context(cache, context)
    return _ms_per_call(graph.replay, reps)


def greedy_ms(model, batch: int, context: int, chain: int, tokens: int = 64, reps: int = 5) -> float:
    """ms per token of greedy `Generator.decode_n_tokens` calls of `tokens` tokens (the fused step, graph mode)."""
    gc.collect()
    torch.cuda.empty_cache()
    gen = Generator(model, batch, context + (reps + 3) * tokens + 1, mode="graph", step="fused", chain=chain)
    _at_context(gen.cache, context)
    tok = torch.zeros(batch, dtype=torch.long, device=model.device)
    return _ms_per_call(lambda: gen.decode_n_tokens(tok, tokens), reps) / tokens


def fused_kernels(model, batch: int, context: int, top: int = 12) -> dict:
    """One profiler pass over 4 eagerly launched fused steps: kernels per token and the costliest ones."""
    gen = Generator(model, batch, 2 * context, mode="static", step="fused")
    _at_context(gen.cache, context)
    tok = torch.zeros(batch, dtype=torch.long, device=model.device)

    def greedy():
        tok.copy_(gen.decode_one_token(tok).argmax(-1))

    _ms_per_call(greedy, 1)  # warm-up (Triton compilation)
    return profile_kernels(greedy, top, repeats=4)


def chain_floor(model, context: int, rounds: int = 3) -> dict:
    """Batch 1, graph alone, ms per token: the model and the same layer schedule at TINY_WIDTHS, with the default
    split layers and with none, `rounds` times in turn."""
    tiny = build_model(model.config.replace(**TINY_WIDTHS), "cuda", torch.bfloat16)
    out = {}
    for _ in range(rounds):
        for name, m in (("tiny_widths", tiny), ("model", model)):
            for split_name, split in (("default", None), ("none", False)):
                ms = fused_graph_ms(m, 1, context, split=split)
                out.setdefault(name, {}).setdefault(split_name, []).append(ms)
                print(f"batch   1 fused graph alone, {name:<11} split {split_name:<7} {ms:.4f} ms/token", flush=True)
    out["tiny_widths_config"] = TINY_WIDTHS
    return out


def sweep(model, batch: int, context: int, candidates: dict, reps: int = 60, split=None) -> dict:
    """Coordinate descent over `candidates` (one kernel family at a time, each keeping the best of the ones
    before) from default_tiles(batch), with the static step's time beside it; a candidate that does not fit
    the device (shared memory) is logged as such."""
    from triton.runtime.errors import OutOfResources

    best, log = {}, []
    for family, cands in candidates.items():
        times = []
        for c in cands:
            try:
                times.append(fused_graph_ms(model, batch, context, dict(best, **{family: c}), split=split, reps=reps))
                log.append(dict(family=family, tiles=c, ms=times[-1]))
            except OutOfResources as e:
                times.append(float("inf"))
                log.append(dict(family=family, tiles=c, error=str(e)[:200]))
        i = min(range(len(times)), key=times.__getitem__)
        best[family] = cands[i]
        print(f"  batch {batch} {family}: best {cands[i]} {times[i]:.4f} ms", flush=True)
    return dict(best=best, ms=fused_graph_ms(model, batch, context, best, split=split, reps=reps),
                static_ms=graph_ms(model, batch, "static", context, reps=reps), log=log)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-1b")
    p.add_argument("--variant", default="jamba", choices=VARIANTS,
                   help="the preset's layout, or the pure Transformer / pure Mamba model of its active size")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", default="fused,static,compiled", help="Generator step kinds to time")
    p.add_argument("--sweep", action="store_true", help="also sweep the fused kernels' GEMV tiles (batch 1)")
    p.add_argument("--sweep-rows", default="", metavar="BATCHES",
                   help="comma-separated batches at which to sweep the tensor-core tiles (e.g. 128,256)")
    p.add_argument("--split-kinds", action="store_true",
                   help="batch 1: the graph alone with no layer split, each kind split alone, the default and all")
    p.add_argument("--chain-floor", action="store_true",
                   help="batch 1: the graph alone of the model and of its layer schedule at tiny widths")
    p.add_argument("--pack", action="store_true",
                   help="batch 1: the graph alone with packed-word GEMVs and with bf16 elements, three rounds")
    p.add_argument("--fold-router", action="store_true",
                   help="batch 1: the graph alone with folded routers and with router kernels, three rounds")
    p.add_argument("--greedy-blocks", action="store_true",
                   help="greedy decoding in blocks of tokens per graph replay and token by token, three rounds")
    p.add_argument("--no-profile", action="store_true",
                   help="only the step kinds through the Generator (no profiler pass, no graph-alone PDL on/off)")
    p.add_argument("--out", default="benchmarks/results/decode_step_profile.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_step needs a CUDA GPU (graph replays and the profiler's CUDA kernels)")
    config = variant_configs(JambaConfig.from_name(args.preset), [args.variant])[args.variant]
    model = build_model(config, "cuda", torch.bfloat16)
    record = dict(benchmark="decode step: graph-replayed ms per token by step kind, and the fused step's kernels",
                  preset=args.preset, variant=args.variant, context=args.context,
                  cache_positions=2 * args.context, dtype="bfloat16",
                  machine=machine())
    for batch in (int(b) for b in args.batches.split(",")):
        for step in args.steps.split(","):
            record[f"graph_{step}_b{batch}_ms"] = ms = graph_ms(model, batch, step, args.context)
            print(f"{args.variant} context {args.context} batch {batch:3d} {step:<9} {ms:.3f} ms/token", flush=True)
        if args.no_profile:
            continue
        record[f"fused_b{batch}"] = fused_kernels(model, batch, args.context)
        for pdl in (True, False):
            record[f"fused_graph_pdl_{pdl}_b{batch}_ms"] = ms = fused_graph_ms(model, batch, args.context, pdl=pdl)
            print(f"batch {batch:3d} fused graph alone, PDL {'on ' if pdl else 'off'} {ms:.4f} ms/token", flush=True)
        if batch == 1:  # the default split layers against none
            for name, split in (("default", None), ("none", False)):
                record[f"fused_graph_split_{name}_b1_ms"] = ms = fused_graph_ms(model, 1, args.context, split=split)
                print(f"batch   1 fused graph alone, split layers {name:<7} {ms:.4f} ms/token", flush=True)
    if args.split_kinds:  # two rounds, every variant once per round
        variants = [("none", False)] + [(k, (k,)) for k in SPLIT_KINDS] + [("default", None), ("all", True)]
        for r in range(2):
            for name, split in variants:
                ms = fused_graph_ms(model, 1, args.context, split=split)
                record.setdefault("split_kinds_b1_ms", {}).setdefault(name, []).append(ms)
                print(f"batch   1 fused graph alone, split {name:<8} {ms:.4f} ms/token", flush=True)
    if args.pack:
        for r in range(3):
            for pack in (True, False):
                ms = fused_graph_ms(model, 1, args.context, pack=pack)
                record.setdefault("pack_b1_ms", {}).setdefault("packed" if pack else "elements", []).append(ms)
                print(f"batch   1 fused graph alone, {'packed words' if pack else 'elements':<12} {ms:.4f} ms/token",
                      flush=True)
    if args.fold_router:
        for r in range(3):
            for fold in (True, False):
                ms = fused_graph_ms(model, 1, args.context, fold_router=fold)
                name = "folded" if fold else "router kernels"
                record.setdefault("fold_router_b1_ms", {}).setdefault(name, []).append(ms)
                print(f"batch   1 fused graph alone, {name:<14} {ms:.4f} ms/token", flush=True)
    if args.greedy_blocks:
        for batch in (int(b) for b in args.batches.split(",")):
            for r in range(3):
                for chain in (CHAIN, 0):
                    ms = greedy_ms(model, batch, args.context, chain)
                    name = f"blocks of {chain}" if chain else "token by token"
                    record.setdefault(f"greedy_b{batch}_ms", {}).setdefault(name, []).append(ms)
                    print(f"batch {batch:3d} greedy decoding, {name:<14} {ms:.4f} ms/token", flush=True)
    if args.chain_floor:
        record["chain_floor_b1_ms"] = chain_floor(model, args.context)
    if args.sweep:  # one row: the default step, every kind split, and the kernel chain (split off)
        record["sweep_b1"] = sweep(model, 1, args.context, {
            k: v for k, v in GEMV_CANDIDATES.items() if k not in UNUSED_WITH_SPLIT and k != "ffn_split"})
        record["sweep_b1_split_all"] = sweep(model, 1, args.context, {"ffn_split": GEMV_CANDIDATES["ffn_split"]},
                                             split=True)
        record["sweep_b1_chain"] = sweep(model, 1, args.context, {
            k: v for k, v in GEMV_CANDIDATES.items() if k not in SPLIT_ONLY}, split=False)
    for batch in (int(b) for b in args.sweep_rows.split(",") if b):
        record[f"sweep_b{batch}"] = sweep(model, batch, args.context, DOT_CANDIDATES, reps=30)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
