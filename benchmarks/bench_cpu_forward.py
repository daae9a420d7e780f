"""CPU forward throughput: openjamba vs transformers' JambaForCausalLM, same config, same weights, one run.

    python benchmarks/bench_cpu_forward.py                       # jamba-10m, shapes 1x512, 4x256, 1x2048
    python benchmarks/bench_cpu_forward.py --shapes 1x128,2x1024 --repeats 7 --threads 4

Both models run fp32, in eval mode under no_grad, on the same inputs with the same thread count. Each
repeat times the two models back to back (alternating which goes first) so that drift in machine load
hits both alike; the median over repeats is reported after warm-up runs. The max-abs difference of the
logits checks that the two compute the same function. Writes benchmarks/results/cpu_forward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from openjamba import JambaConfig, JambaForCausalLM


def build_models(preset: str, seed: int):
    """Our model with random weights, and transformers' model holding exactly the same tensors."""
    import transformers

    # Its notices that the compiled Mamba kernels are absent are expected here: the CPU path is measured.
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = JambaConfig.from_name(preset)
    ours = JambaForCausalLM(config).eval()
    hf_config = transformers.JambaConfig(**config.to_dict())
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.JambaForCausalLM(hf_config).eval()
    # The in-memory parameter names and shapes are the same (fused 3-D experts in both), so no conversion.
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    return ours, theirs


def time_forward(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="jamba-10m")
    p.add_argument("--shapes", default="1x512,4x256,1x2048", help="comma-separated BATCHxSEQ")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "cpu_forward.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]

    import transformers

    ours, theirs = build_models(args.preset, args.seed)
    counts = ours.config.param_counts()
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   python=sys.version.split()[0], cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                   torch=torch.__version__, transformers=transformers.__version__)
    print(f"{args.preset}: {counts['total'] / 1e6:.1f}M total / {counts['active'] / 1e6:.1f}M active params, fp32")
    print(f"machine: {machine['platform']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, transformers {machine['transformers']}")
    print(f"{'shape':>8} {'openjamba tok/s':>16} {'transformers tok/s':>19} {'speed-up':>9} {'max |dlogits|':>14}")

    results = []
    g = torch.Generator().manual_seed(args.seed)
    for B, T in shapes:
        ids = torch.randint(0, ours.config.vocab_size, (B, T), generator=g)
        with torch.no_grad():
            run_ours = lambda: ours(ids).logits  # noqa: E731
            run_theirs = lambda: theirs(input_ids=ids, use_cache=False).logits  # noqa: E731
            diff = (run_ours() - run_theirs()).abs().max().item()
            for _ in range(args.warmup):
                run_ours(), run_theirs()
            t_ours, t_theirs = [], []
            for r in range(args.repeats):
                first, second = (run_ours, run_theirs) if r % 2 == 0 else (run_theirs, run_ours)
                a, b = time_forward(first, 1)[0], time_forward(second, 1)[0]
                (t_ours, t_theirs)[r % 2].append(a)
                (t_theirs, t_ours)[r % 2].append(b)
        med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
        row = dict(batch=B, seq=T, tokens=B * T, openjamba_s=med_ours, transformers_s=med_theirs,
                   openjamba_tokens_per_s=B * T / med_ours, transformers_tokens_per_s=B * T / med_theirs,
                   speedup=med_theirs / med_ours, max_abs_logits_diff=diff,
                   openjamba_times_s=t_ours, transformers_times_s=t_theirs)
        results.append(row)
        print(f"{f'{B}x{T}':>8} {row['openjamba_tokens_per_s']:>16,.0f} {row['transformers_tokens_per_s']:>19,.0f} "
              f"{row['speedup']:>8.1f}x {diff:>14.2e}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(benchmark="cpu_forward", preset=args.preset, dtype="fp32", repeats=args.repeats,
                       warmup=args.warmup, params=counts, machine=machine, results=results), f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
