"""Scaling efficiency of FSDP2 + expert-parallel training steps: N ranks vs one device, in one run.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_distributed.py --preset jamba-100m --steps 20
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_distributed.py --device cpu --preset jamba-tiny \
        --batch 2 --seq 32 --steps 3 --warmup 1          # CPU / gloo smoke run

Weak scaling: every rank processes `--batch` sequences of `--seq` tokens per step (forward, backward,
optimizer step). First rank 0 alone trains an unsharded copy of the model (the one-device baseline; the
other ranks wait), then all ranks train with `parallelize(fsdp=True, expert_parallel=--ep)`.

    scaling efficiency = tokens/s on N ranks / (N * tokens/s on one device)

Prints a table and writes JSON to benchmarks/results/distributed_<device>_<N>x.json (rank 0).
Absolute numbers mean something only on the GPU machine; the CPU run checks that the script works.
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
from openjamba.bench.common import profile_kernels
from openjamba.train.distributed import DistInfo, barrier, cleanup, init_distributed, parallelize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model, impl: str):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **{impl: True})


def time_steps(model, device, args, vocab: int, dist: DistInfo | None) -> dict:
    """Median and mean step time over `args.steps` timed steps after `args.warmup` untimed ones; with
    `--profile K`, then one more step under the profiler on every rank (rank 0's kernels are recorded)."""
    opt = _optimizer(model, args.optimizer)
    g = torch.Generator().manual_seed(0 if dist is None else dist.rank)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step():
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        if dist is not None:
            barrier(dist)  # start every step together so the slowest rank sets the pace, as in training
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times),
              "peak_mem_gib": peak, "final_loss": float(loss.detach())}
    if args.profile and device.type == "cuda":
        if dist is not None:
            barrier(dist)
        result["profile"] = profile_kernels(step, args.profile)
    del opt
    return result


def link_bandwidth(dist: DistInfo, mib: int = 256, repeats: int = 10) -> dict:
    """GB/s of the two collectives training uses between the ranks: all_gather (FSDP) and all_to_all
    (expert dispatch), each moving `mib` MiB of bf16 per rank. "bus" GB/s counts the bytes that cross
    the links, (world - 1) / world of the buffer, as nccl-tests does."""
    world, device = dist.world_size, dist.device
    n = mib * 2**20 // 2
    shard, full = (torch.ones(k, dtype=torch.bfloat16, device=device) for k in (n // world, n))
    dst = torch.empty_like(full)
    ops = {"all_gather": lambda: torch.distributed.all_gather_into_tensor(dst, shard),
           "all_to_all": lambda: torch.distributed.all_to_all_single(dst, full)}
    out = {}
    for name, op in ops.items():
        for _ in range(3):
            op()
        _sync(device)
        barrier(dist)
        t0 = time.perf_counter()
        for _ in range(repeats):
            op()
        _sync(device)
        dt = (time.perf_counter() - t0) / repeats
        out[name] = {"mib": mib, "ms": 1e3 * dt, "bus_gb_s": n * 2 * (world - 1) / world / dt / 1e9}
    return out


def build(args, device) -> JambaForCausalLM:
    torch.manual_seed(0)  # identical weights on every rank, as parallelize requires
    cfg = JambaConfig.from_name(args.preset)
    return JambaForCausalLM(cfg).to(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="jamba-100m")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ep", type=int, default=0, help="expert-parallel degree (0 = world size)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="bf16 autocast (default on GPU)")
    p.add_argument("--param-dtype", choices=["bf16", "fp32"], default=None,
                   help="dtype FSDP gathers parameters in (fp32 master weights either way); default bf16 "
                        "under --dtype bf16, as `openjamba train` does with autocast")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="profile one more step of each run and record its K most expensive GPU kernels")
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile per layer")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default=None,
                   help="AdamW implementation (default: fused on GPU, as in training; foreach on CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the one-device run")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distributed_*.json)")
    args = p.parse_args()

    dist = init_distributed(args.device)
    device = dist.device
    args.optimizer = args.optimizer or ("fused" if device.type == "cuda" else "foreach")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.param_dtype = args.param_dtype or args.dtype
    param_dtype = torch.bfloat16 if args.param_dtype == "bf16" else None
    world = dist.world_size
    ep = args.ep or world
    tokens_per_rank = args.batch * args.seq

    single = None
    if not args.no_baseline:
        if dist.is_main:
            model = build(args, device)
            parallelize(model, DistInfo(device=device), activation_checkpointing=args.ac, compile=args.compile)
            single = time_steps(model, device, args, model.config.vocab_size, None)
            single["tokens_per_s"] = tokens_per_rank / single["step_s_median"]
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        barrier(dist)

    multi = link = None
    if world > 1 and device.type == "cuda":
        link = link_bandwidth(dist)
    if world > 1:
        model = build(args, device)
        parallelize(model, dist, fsdp=True, expert_parallel=ep, activation_checkpointing=args.ac,
                    compile=args.compile, param_dtype=param_dtype)
        multi = time_steps(model, device, args, model.config.vocab_size, dist)
        multi["tokens_per_s"] = world * tokens_per_rank / multi["step_s_median"]
        # slowest rank's peak memory is what limits the batch
        if multi["peak_mem_gib"] is not None:
            peak = torch.tensor(multi["peak_mem_gib"], device=device)
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            multi["peak_mem_gib"] = float(peak)

    if dist.is_main:
        machine = (f"{world} x {torch.cuda.get_device_name(device)}" if device.type == "cuda"
                   else f"{world} process(es) on CPU ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores), gloo")
        result = {"machine": machine, "torch": torch.__version__, "preset": args.preset, "world_size": world,
                  "expert_parallel": ep, "batch_per_rank": args.batch, "seq": args.seq, "dtype": args.dtype,
                  "param_dtype": args.param_dtype, "link": link,
                  "optimizer": f"AdamW {args.optimizer}",
                  "activation_checkpointing": args.ac, "compile": args.compile, "steps": args.steps,
                  "warmup": args.warmup, "single_device": single, "distributed": multi}
        if single and multi:
            result["scaling_efficiency"] = multi["tokens_per_s"] / (world * single["tokens_per_s"])
        print(f"machine: {machine}; preset {args.preset}; {args.batch} x {args.seq} tokens per rank; {args.dtype}")
        print(f"{'run':<28}{'step (ms)':>12}{'tokens/s':>14}{'peak GiB':>10}")
        for name, r in (("1 device", single), (f"{world} ranks FSDP2 + EP={ep}", multi)):
            if r:
                mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
                print(f"{name:<28}{1e3 * r['step_s_median']:>12.1f}{r['tokens_per_s']:>14.0f}{mem:>10}")
        for name, r in (("1 device", single), ("distributed", multi)):
            if r and "profile" in r:
                print(f"profile ({name}, rank 0): {r['profile']['gpu_ms']:.1f} ms of GPU kernels")
                for k in r["profile"]["top"]:
                    print(f"    {k['ms']:8.2f} ms {k['calls']:6.0f}x  {k['name'][:90]}")
        if link:
            print("link: " + ", ".join(f"{k} {v['bus_gb_s']:.0f} GB/s (bus, {v['mib']} MiB)" for k, v in link.items()))
        if "scaling_efficiency" in result:
            print(f"scaling efficiency: {100 * result['scaling_efficiency']:.1f}%")
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"distributed_{device.type}_{world}x.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    cleanup(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
