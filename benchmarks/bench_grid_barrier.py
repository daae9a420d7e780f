"""What one step boundary costs on this GPU: a grid-wide barrier inside one persistent kernel against a
kernel boundary in a chain of dependent kernels (CUDA graph, with and without programmatic dependent launch).

    python benchmarks/bench_grid_barrier.py

The persistent kernel runs P programs (one or two per SM) through 2000 barriers: each program stores a
value, arrives on a global counter (atomic add, release) and spins until every program has arrived (either
`ld.acquire.gpu` or atomic adds of 0), then checks a neighbour's value (errors are reported). The chain is
200 launches of a kernel of P programs that each read a neighbour's value and write their own. Both count
the whole round trip from the last write of one step to the first read of the next. Writes
benchmarks/results/grid_barrier_<gpu>.json (or --out). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _ld_acquire(p):
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [p], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def barrier_kernel(bar_ptr, data_ptr, err_ptr, NB, P: tl.constexpr, SPIN: tl.constexpr):
    pid = tl.program_id(0)
    err = 0
    for i in range(NB):
        tl.store(data_ptr + (i % 2) * P + pid, i)
        tl.debug_barrier()
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        target = (i + 1) * P
        if SPIN == 0:
            c = _ld_acquire(bar_ptr)
            while c < target:
                c = _ld_acquire(bar_ptr)
        else:
            c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
            while c < target:
                c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        v = tl.load(data_ptr + (i % 2) * P + (pid + 1) % P, cache_modifier=".cg")
        err += (v != i).to(tl.int32)
    tl.store(err_ptr + pid, err)


@triton.jit
def chain_kernel(x_ptr, P: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    v = tl.load(x_ptr + (pid + 1) % P, cache_modifier=".cg")
    tl.store(x_ptr + P + pid, v + 1)
    tl.debug_barrier()
    tl.store(x_ptr + pid, v + 1)


def _us(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_grid_barrier needs a CUDA GPU")
    from openjamba.bench.common import machine

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for P in (sms, 2 * sms):
        for warps in (4, 8):
            for spin, spin_name in ((0, "ld.acquire"), (1, "atomic")):
                bar = torch.zeros(1, dtype=torch.int32, device="cuda")
                data = torch.zeros(2 * P, dtype=torch.int32, device="cuda")
                err = torch.zeros(P, dtype=torch.int32, device="cuda")

                def run(nb):
                    bar.zero_()
                    barrier_kernel[(P,)](bar, data, err, nb, P=P, SPIN=spin, num_warps=warps)
                per = (_us(lambda: run(2001)) - _us(lambda: run(1))) / 2000
                run(2001)
                torch.cuda.synchronize()
                rows.append(dict(kind="grid barrier", programs=P, warps=warps, spin=spin_name, us=per,
                                 errors=int(err.sum())))
                print(f"grid barrier, {P} programs of {warps} warps, spin on {spin_name}: {per:.3f} us "
                      f"(errors {int(err.sum())})", flush=True)
    for P in (sms, 2 * sms):
        for pdl in (True, False):
            x = torch.zeros(2 * P, dtype=torch.int32, device="cuda")
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            with torch.cuda.stream(stream):
                chain_kernel[(P,)](x, P=P, PDL=pdl, launch_pdl=pdl)
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(200):
                        chain_kernel[(P,)](x, P=P, PDL=pdl, launch_pdl=pdl)
            per = _us(graph.replay) / 200
            rows.append(dict(kind="kernel chain", programs=P, pdl=pdl, us=per))
            print(f"kernel chain, {P} programs, PDL {'on' if pdl else 'off'}: {per:.3f} us per kernel", flush=True)
    info = machine()
    out = args.out or os.path.join("benchmarks", "results",
                                   f"grid_barrier_{info.get('gpu', 'gpu').split()[-1].lower()}.json")
    with open(out, "w") as f:
        json.dump(dict(benchmark="grid barrier vs kernel boundary", machine=info, rows=rows), f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
