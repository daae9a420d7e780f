"""Training throughput and MFU of one GPU: the trainer's own step on the jamba-1b preset.

    python benchmarks/bench_train.py                          # jamba-1b, batch 8 x 2048, bf16 weights
    python benchmarks/bench_train.py --variants eager,compile  # several variants in one run, one table
    python benchmarks/bench_train.py --preset jamba-tiny --batch 2 --seq 64 --steps 2 --device cpu   # smoke test

A step is exactly what `openjamba train` does per optimizer step (forward, cross-entropy + router aux loss,
backward, gradient-norm clipping, the AdamW update (optim.fused "auto": ClippedAdamW, which clips as it
updates) skipped on the device when the loss is not finite, the loss read on the host one step later),
on random tokens; steps run back to back and the mean is reported. Variants:
    eager       bf16 weights (as the transformers + mamba-ssm figure in the anchors was measured)
    compile     the same with torch.compile per decoder layer
    autocast    fp32 master weights under bf16 autocast (what `openjamba train` uses on GPUs by default)
    compile-autocast  the same with torch.compile per decoder layer
    ac          eager with activation checkpointing
    deterministic, graph-deterministic   eager / graph under train.deterministic (torch's deterministic
                algorithms, strict)
    graph, compile-graph   eager / compile with the step's forward + backward + gradient norm replayed as
                one CUDA graph and the ClippedAdamW update as a second (train.cuda_graph; the first steps
                run eagerly, then the step is captured)
    compile-graph-torch-adamw   compile-graph with torch's fused AdamW after clip_grad_norm_ instead of
                ClippedAdamW (optim.fused "true" instead of "auto"; see openjamba/train/optim.py)
    autocast-torch-adamw   autocast with torch's fused AdamW after clip_grad_norm_ instead of ClippedAdamW
    compile-graph-torch-swiglu   compile-graph with the experts' silu(gate) * up left to torch.compile
                instead of the Triton kernels of openjamba/ops/moe/swiglu.py
MFU = tokens/s x (6 x active params + 12 x attention layers x hidden x seq) / peak, against the H200's
989 TFLOP/s dense bf16 datasheet peak and the 792 TFLOP/s measured by an 8192^3 matmul. Reference:
transformers JambaForCausalLM + mamba-ssm, same config and shapes: 79.7K tokens/s, 34.6 GB peak.
Writes benchmarks/results/train_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from openjamba import ops
from openjamba.bench.common import profile_kernels
from openjamba.config import JambaConfig
from openjamba.model import JambaForCausalLM
from openjamba.ops.moe import swiglu
from openjamba.train.config import TrainConfig
from openjamba.train.metrics import H200_BF16_MEASURED, H200_BF16_PEAK, flops_per_token
from openjamba.train.optim import build_optimizer, optimizer_kind
from openjamba.train.distributed import DistInfo
from openjamba.train.trainer import StepRunner, deterministic_algorithms, prepare_model

BASELINE_TOKENS_PER_S = 79.7e3  # transformers + mamba-ssm kernels, same H200 (anchors)
VARIANTS = {
    "eager": dict(precision="bf16"),
    "compile": dict(precision="bf16", compile=True),
    "autocast": dict(precision="autocast"),
    "compile-autocast": dict(precision="autocast", compile=True),
    "graph": dict(precision="bf16", cuda_graph=True),
    "compile-graph": dict(precision="bf16", compile=True, cuda_graph=True),
    "compile-graph-torch-adamw": dict(precision="bf16", compile=True, cuda_graph=True, fused="true"),
    "autocast-torch-adamw": dict(precision="autocast", fused="true"),
    "compile-graph-torch-swiglu": dict(precision="bf16", compile=True, cuda_graph=True, triton_swiglu=False),
    "ac": dict(precision="bf16", activation_checkpointing=True),
    "deterministic": dict(precision="bf16", deterministic=True),
    "graph-deterministic": dict(precision="bf16", cuda_graph=True, deterministic=True),
}


def run_variant(name: str, args, device: torch.device) -> dict:
    if VARIANTS[name].get("deterministic"):
        with deterministic_algorithms():
            return _run_variant(name, args, device)
    return _run_variant(name, args, device)


def _run_variant(name: str, args, device: torch.device) -> dict:
    spec = VARIANTS[name]
    cfg = TrainConfig()
    cfg.train.precision = spec["precision"] if device.type == "cuda" else "fp32"
    cfg.train.compile = spec.get("compile", False)
    cfg.train.cuda_graph = spec.get("cuda_graph", False)
    cfg.train.activation_checkpointing = spec.get("activation_checkpointing", False)
    cfg.optim.fused = spec.get("fused", "auto")
    swiglu.USE_TRITON = spec.get("triton_swiglu", True)
    cfg.data.seq_len, cfg.data.batch_size = args.seq, args.batch
    torch.manual_seed(0)
    config = JambaConfig.from_name(args.preset)
    dist = DistInfo(device=device)
    with device:  # initialise on the device itself: seconds instead of a minute of CPU init for 1B
        model = JambaForCausalLM(config)
    model = prepare_model(model, cfg, dist, cfg.train.precision)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, device)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        batch = batch.pin_memory()

    runner = StepRunner(model, optimizer, config, cfg, cfg.train.precision, dist)
    pending = []
    last_loss = [float("nan")]

    def settle():
        while pending:
            last_loss[0] = runner.finish(pending.pop())[0]

    def step():
        """One step as the trainer runs it; in deferred mode the previous step's loss is read meanwhile."""
        launched = runner.launch([batch], cfg.optim.lr)
        settle()
        pending.append(launched)
        if not runner.deferred:
            settle()

    def drain():
        settle()
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation (and the graph capture) where the variant has them
        step()
    drain()
    warmup_s = time.perf_counter() - start
    # steps back to back, as in training: the host may run ahead of the GPU by a step
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + args.max_seconds
    while n < args.steps:
        step()
        n += 1
        if time.perf_counter() > deadline:
            break
    drain()
    step_s = (time.perf_counter() - t0) / n
    profile = profile_kernels(lambda: (step(), drain()), args.profile) if args.profile and device.type == "cuda" \
        else None
    tokens = args.batch * args.seq
    tps = tokens / step_s
    fpt = flops_per_token(config, args.seq)
    result = {
        "variant": name, "precision": cfg.train.precision, "compile": cfg.train.compile,
        "adamw": optimizer_kind(optimizer),
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "steps_timed": n, "warmup_s": round(warmup_s, 2), "step_ms": step_s * 1e3, "deferred_check": runner.deferred,
        "tokens_per_s": tps, "loss": last_loss[0],
        "mfu_vs_989": tps * fpt / H200_BF16_PEAK, "mfu_vs_792": tps * fpt / H200_BF16_MEASURED,
        "vs_transformers_mamba_ssm": tps / BASELINE_TOKENS_PER_S,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
    }
    if profile is not None:
        result["profile"] = profile
    return result  # the model and optimizer go with this frame: the next variant starts from empty memory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant, run back to back (mean reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=120, help="stop timing a variant after this long")
    p.add_argument("--variants", default="eager", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="also profile one step per variant and record the K most expensive GPU kernels")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_<preset>_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    config = JambaConfig.from_name(args.preset)
    counts = config.param_counts()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{args.preset}: {counts['total'] / 1e6:.0f}M total / {counts['active'] / 1e6:.0f}M active parameters; "
          f"batch {args.batch} x {args.seq}; {machine}; ops backend {ops.get_backend()}; torch {torch.__version__}")
    results = []
    for name in names:
        try:
            results.append(run_variant(name, args, device))
        except Exception as e:  # one failing variant must not hide the others' figures
            results.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = results[-1]
        if "error" in r:
            print(f"  {name:<9} failed: {r['error']}")
        else:
            mem = f"{r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] is not None else "-"
            print(f"  {name:<26} {r['tokens_per_s'] / 1e3:8.1f}K tokens/s  {r['step_ms']:8.1f} ms/step  "
                  f"MFU {100 * r['mfu_vs_989']:5.1f}% of 989 / {100 * r['mfu_vs_792']:5.1f}% of 792  "
                  f"{r['vs_transformers_mamba_ssm']:5.2f}x transformers+mamba-ssm  peak {mem}")
            if "profile" in r:
                print(f"    profile: {r['profile']['gpu_ms']:.1f} ms of GPU kernels, {r['profile']['kernels']} kinds")
                for k in r["profile"]["top"]:
                    print(f"    {100 * k['share']:5.1f}% {k['ms']:8.2f} ms {k['calls']:5.0f}x  {k['name']}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"train_{args.preset}_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {"machine": machine, "torch": torch.__version__, "ops_backend": ops.get_backend(),
              "preset": args.preset, "total_params": counts["total"], "active_params": counts["active"],
              "batch": args.batch, "seq_len": args.seq, "flops_per_token": flops_per_token(config, args.seq),
              "baseline_tokens_per_s": BASELINE_TOKENS_PER_S, "results": results}
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
