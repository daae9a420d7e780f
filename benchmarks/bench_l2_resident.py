"""What weights already in L2 are worth to the batch-1 fused decode step: an upper bound for any scheme that
streams a kernel's weights into L2 before it runs (prefetch from an earlier kernel, a concurrent streamer).

    python benchmarks/bench_l2_resident.py               # jamba-1b, bf16, batch 1

For each piece of a layer the fused step runs (the dense MLP: ffn_up + down_residual; the MoE: router +
ffn_up + down_residual; the Mamba mixer: mamba_in + mamba_ssm + down_residual), one CUDA graph of --calls
PDL-launched calls, as in the step, in two orders side by side: the same layer every call (its weights stay
in L2 after the first: 17 MB for a dense MLP, about 13 MB for a Mamba mixer, 35 MB for two picked experts)
and the model's layers of that kind in turn (weights from HBM, as in the step). The difference per call,
times the layers of each kind, bounds what L2-resident weights can save per token. Writes
benchmarks/results/l2_resident_<gpu>.json (or --out). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from openjamba.bench.common import build_model, machine
from openjamba.config import JambaConfig
from openjamba.inference import FusedDecodeStep


def graph_us_per_call(run, calls: int, rounds: int = 3, reps: int = 20) -> list[float]:
    """Capture `run` (which makes `calls` calls) in a CUDA graph; microseconds per call, one value per round."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        run()  # warm-up: Triton compilation
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        run()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / reps / calls * 1e6)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-1b")
    p.add_argument("--calls", type=int, default=64, help="calls per captured graph")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_l2_resident needs a CUDA GPU (graph replays of the fused kernels)")
    model = build_model(JambaConfig.from_name(args.preset), "cuda", torch.bfloat16)
    step = FusedDecodeStep(model, 1, split=False)  # the kernel chain: each piece updates h in place
    cache = model.new_cache(1, 2048)
    layers = list(model.model.layers)
    index = {id(layer): i for i, layer in enumerate(layers)}
    h0 = (torch.randn(1, model.config.hidden_size, device="cuda") * 0.5).to(model.dtype)
    h = h0.clone()  # the residual stream the pieces update in place; reset at the start of each graph
    pieces = {
        "dense MLP": ([l for l in layers if not l.is_moe], lambda layer: step.ffn(h, layer)),
        "MoE": ([l for l in layers if l.is_moe], lambda layer: step.ffn(h, layer)),
        "Mamba mixer": ([l for l in layers if not l.is_attention],
                        lambda layer: step.mamba(h, layer, cache, index[id(layer)])),
    }
    rows = []
    for name, (of_kind, call) in pieces.items():
        times = {}
        for order in ("layers in turn", "same layer"):
            seq = [of_kind[i % len(of_kind)] if order == "layers in turn" else of_kind[0] for i in range(args.calls)]

            def run():
                h.copy_(h0)
                for layer in seq:
                    call(layer)

            times[order] = graph_us_per_call(run, args.calls)
            print(f"{name:<12} {order:<15} {min(times[order]):7.2f} us per call "
                  f"({', '.join(f'{t:.2f}' for t in times[order])})", flush=True)
        saved = min(times["layers in turn"]) - min(times["same layer"])
        rows.append(dict(piece=name, layers=len(of_kind), us_per_call=times, saved_us_per_call=saved,
                         saved_us_per_token=saved * len(of_kind)))
    total = sum(r["saved_us_per_token"] for r in rows)
    print(f"weights in L2 would save at most {total:.1f} us per token across these pieces")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"l2_resident_{torch.cuda.get_device_name().split()[-1].lower()}.json")
    with open(out, "w") as f:
        json.dump(dict(benchmark="fused decode step pieces: weights L2-resident vs from HBM", preset=args.preset,
                       batch=1, dtype="bfloat16", calls=args.calls, machine=machine(), rows=rows,
                       saved_us_per_token=total), f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
