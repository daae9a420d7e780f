"""The experts' gated activation (openjamba/ops/moe/swiglu.py) against the same expression compiled by
torch.compile, at jamba-1b's training size, plus a sweep of the kernel's tiles, in one run.

    PYTHONPATH=. python benchmarks/bench_swiglu.py [--out benchmarks/results/swiglu_h200.json]

Input: the (P, 2F) output of the first grouped matmul, P = 32888 padded rows (16384 tokens x top-2 + the
padding of 8 experts), F = 2816, bf16. Times are medians of triton.testing.do_bench: the forward alone and
forward + backward (autograd, gradient dy given). The forward moves 3 x P x F x 2 bytes, the backward
5 x P x F x 2. JSON: {variant: [forward ms, forward + backward ms]}.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from openjamba.ops.moe import swiglu as sw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "swiglu_h200.json"))
    args = p.parse_args(argv)
    P, F = 32888, 2816
    torch.manual_seed(0)
    x = (torch.randn(P, 2 * F, device="cuda") * 2).to(torch.bfloat16)
    dy = torch.randn(P, F, device="cuda").to(torch.bfloat16)
    compiled = torch.compile(sw.swiglu_ref)

    def forward(fn):
        return lambda: fn(x)

    def forward_backward(fn):
        def run():
            a = x.detach().requires_grad_()
            fn(a).backward(dy)
        return run

    res = {}
    for name, fn in (("inductor", compiled), ("triton", sw._SwiGLU.apply)):
        f, t = do_bench(forward(fn), warmup=50, rep=300), do_bench(forward_backward(fn), warmup=50, rep=300)
        res[name] = (f, t)
        print(f"{name:9s} fwd {f * 1e3:7.1f} us ({3 * P * F * 2 / f / 1e9:.2f} TB/s)  fwd+bwd {t * 1e3:7.1f} us  "
              f"bwd ~{(t - f) * 1e3:7.1f} us ({5 * P * F * 2 / (t - f) / 1e9:.2f} TB/s)")
    default = (sw.BLOCK_R, sw.BLOCK_C, sw.NUM_WARPS)
    for br, bc, nw in [(8, 256, 4), (4, 256, 4), (16, 256, 8), (2, 512, 4), (4, 512, 8), (1, 1024, 4),
                       (32, 128, 8), (8, 128, 4)]:
        sw.BLOCK_R, sw.BLOCK_C, sw.NUM_WARPS = br, bc, nw
        f = do_bench(forward(sw._SwiGLU.apply), warmup=30, rep=200)
        t = do_bench(forward_backward(sw._SwiGLU.apply), warmup=30, rep=200)
        res[f"{br}x{bc}x{nw}"] = (f, t)
        print(f"  tile {br:2d}x{bc:4d} w{nw}: fwd {f * 1e3:7.1f} us  fwd+bwd {t * 1e3:7.1f} us  "
              f"bwd ~{(t - f) * 1e3:7.1f}")
    sw.BLOCK_R, sw.BLOCK_C, sw.NUM_WARPS = default
    ref, out = sw.swiglu_ref(x.float()), sw._SwiGLU.apply(x)
    print("max relative error of the forward", ((out.float() - ref).abs() / (ref.abs() + 1e-3)).max().item())
    with open(args.out, "w") as f:
        json.dump(res, f)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
