"""`openjamba bench decode|memory|prefill|compare|passkey`: the inference benchmarks as CLI verbs.

    add_commands(subparsers)   registers `bench` and its verbs on an argparse sub-parser set (cli.py)
    main(argv)                 standalone entry point (the scripts in benchmarks/ call it)

Every verb writes <out-dir>/<name>.json (and a PNG when matplotlib is installed), prints one line per
point, records points that ran out of memory or time instead of failing, and stops starting new points
after --max-seconds. --quick runs a tiny model on the CPU in seconds (a smoke test of the whole pipeline).
"""

from __future__ import annotations

import argparse
import logging

import torch

from .config import JambaConfig

QUICK_PRESET = "jamba-tiny"


def _common(p: argparse.ArgumentParser, max_seconds: float) -> None:
    p.add_argument("--preset", default="jamba-1b", help="base config (default jamba-1b)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--mode", default="auto", choices=["auto", "eager", "static", "graph"],
                   help="decode step: auto = CUDA graph on CUDA, eager elsewhere")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default=None, help="results file stem (default: the benchmark's)")
    p.add_argument("--max-seconds", type=float, default=max_seconds,
                   help=f"stop starting new points after this many seconds (default {max_seconds:g})")
    p.add_argument("--step", default="auto", choices=["auto", "static", "compiled", "fused"],
                   help="decode step inside the graph: fused Triton kernels (auto on CUDA), the static step op "
                        "by op, or the static step through torch.compile (slow first call per shape)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny sizes on the CPU ({QUICK_PRESET}, fp32, short contexts): runs in seconds")


def _setup(args):
    """Resolve config, dtype, device and the quick-mode overrides shared by every verb."""
    from .bench.common import parse_dtype

    if args.step not in ("auto", "static") and args.mode == "eager":
        raise SystemExit(f"--step {args.step} replaces the static step: use --mode auto, static or graph")
    if args.quick:
        args.preset, args.dtype = QUICK_PRESET, "fp32"
        args.device = args.device or "cpu"
        if args.mode == "auto" and args.device == "cpu":
            args.mode = "static"  # exercise the graph-shaped step even without a GPU
    logging.basicConfig(level=logging.WARNING)
    return JambaConfig.from_name(args.preset), parse_dtype(args.dtype), args.device


def _kw(args, name):
    return dict(device=args.device, max_seconds=args.max_seconds, out_dir=args.out_dir, name=args.name or name)


def cmd_decode(args) -> int:
    from .bench.common import parse_list
    from .bench.decode import run_decode

    cfg, dtype, _ = _setup(args)
    contexts = parse_list("64,256" if args.quick and args.contexts is None else
                          args.contexts or "1K,4K,16K,32K,64K,128K,256K,512K,1M")
    run_decode(cfg, contexts, parse_list(args.variants, str), parse_list(args.batches, str),
               steps=4 if args.quick else args.steps, dtype=dtype, mode=args.mode, step=args.step,
               max_batch_cap=4 if args.quick else args.max_batch, **_kw(args, "decode_throughput"))
    return 0


def cmd_memory(args) -> int:
    from .bench.common import parse_list
    from .bench.memory import run_memory

    cfg, dtype, _ = _setup(args)
    contexts = parse_list("64,256,1K" if args.quick and args.contexts is None else
                          args.contexts or "1K,4K,16K,64K,128K,256K,512K,1M")
    run_memory(cfg, contexts, parse_list(args.variants, str), batch=args.batch, dtype=dtype,
               **_kw(args, "cache_memory"))
    return 0


def cmd_prefill(args) -> int:
    from .bench.long_context import run_prefill
    from .memory import parse_tokens

    cfg, dtype, _ = _setup(args)
    context = 512 if args.quick else parse_tokens(args.context)
    run_prefill(cfg, context, new_tokens=8 if args.quick else args.new_tokens, batch=args.batch,
                chunk_size=128 if args.quick else args.chunk_size, dtype=dtype, mode=args.mode,
                step=args.step, **_kw(args, "long_context"))
    return 0


def cmd_compare(args) -> int:
    from .bench.common import parse_list
    from .bench.versus_hf import run_versus_hf

    cfg, dtype, _ = _setup(args)
    run_versus_hf(cfg, prompt_len=32 if args.quick else args.prompt, new_tokens=8 if args.quick else args.new_tokens,
                  batches=(1, 2) if args.quick else parse_list(args.batches), dtype=dtype, mode=args.mode,
                  step=args.step,
                  **_kw(args, "versus_transformers"))
    return 0


def cmd_passkey(args) -> int:
    from .bench.common import parse_list
    from .bench.long_context import run_passkey

    cfg, dtype, _ = _setup(args)
    if args.quick:
        cfg = cfg.replace(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    contexts = parse_list("300,1K" if args.quick else args.contexts)
    positions = parse_list("0,0.5" if args.quick else args.positions, float)
    run_passkey(cfg, contexts, positions, dtype=dtype, mode=args.mode,
                chunk_size=128 if args.quick else args.chunk_size, **_kw(args, "passkey"))
    return 0


def add_commands(subparsers) -> argparse.ArgumentParser:
    """Register `bench` with verbs decode, memory, prefill, compare, passkey; each sets func(args) -> int."""
    bench = subparsers.add_parser("bench", help="inference benchmarks (JSON + PNG under benchmarks/results)")
    verbs = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    p = verbs.add_parser("decode", help="decode tokens/s vs context: Jamba vs Transformer vs Mamba")
    _common(p, 120)
    p.add_argument("--contexts", default=None, help="comma list, K/M suffixes (default 1K..1M)")
    p.add_argument("--variants", default="jamba,transformer,mamba")
    p.add_argument("--batches", default="1,max", help="batch sizes; 'max' = largest that fits")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per point")
    p.add_argument("--max-batch", type=int, default=256, help="cap for the 'max' batch")
    p.set_defaults(func=cmd_decode)

    p = verbs.add_parser("memory", help="cache memory vs context: measured vs `openjamba memory`")
    _common(p, 40)
    p.add_argument("--contexts", default=None, help="comma list, K/M suffixes (default 1K..1M)")
    p.add_argument("--variants", default="jamba,transformer,mamba")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_memory)

    p = verbs.add_parser("prefill", help="long-context chunked prefill + decode: peak memory and time")
    _common(p, 100)
    p.add_argument("--context", default="1M", help="prompt tokens (e.g. 262144, 256K, 1M)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.set_defaults(func=cmd_prefill)

    p = verbs.add_parser("compare", help="our generate vs transformers' generate, same config")
    _common(p, 60)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,16")
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("passkey", help="constructed passkey retrieval through the cache at long context")
    _common(p, 60)
    p.add_argument("--contexts", default="16K,128K,1M")
    p.add_argument("--positions", default="0", help="relative key positions in the prompt (0 = the first token)")
    p.add_argument("--chunk-size", type=int, default=16384)
    p.set_defaults(func=cmd_passkey)
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openjamba", description="openjamba inference benchmarks")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
