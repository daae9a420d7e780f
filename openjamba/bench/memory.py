"""Cache memory vs context: measured allocations against `openjamba memory`'s formula and the planner.

For each model variant and context the cache is allocated and one decode step is run; recorded are
- cache_measured: torch.cuda.memory_allocated growth from allocating the HybridCache;
- predicted: KV cache + Mamba state from openjamba.memory.memory_report (what `openjamba memory` prints);
- step_peak: max_memory_allocated above weights + cache during one decode step, against the planner's
  decode workspace. On a CPU, where allocations cannot be measured, the cache's own byte count is used and
  the result says so.
This reproduces the shape of the paper's Table 1 (KV cache at long context, Jamba vs Transformer).
"""

from __future__ import annotations

import torch

from ..inference import Generator, plan_memory
from ..memory import memory_report
from .common import VARIANTS, Deadline, build_model, fmt_tokens, free_memory, oom_as_status, pyplot, sync, variant_configs, write_json

_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def measure_cache(model, batch: int, context: int) -> dict:
    device = model.device
    cuda = device.type == "cuda"
    free_memory(device)
    if cuda:
        sync(device)
        before = torch.cuda.memory_allocated(device)
    gen = Generator(model, batch, context, mode="static", chunk_size=256, check_memory=False)
    try:
        if cuda:
            sync(device)
            cache_measured = torch.cuda.memory_allocated(device) - before
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            cache_measured = gen.cache.nbytes()["total"] + gen.cache.key_mask.numel() + gen.cache.positions.numel() * 8
        gen.cache.length = context - 1  # one decode step at the far end of the cache
        gen.cache.sync_position()
        gen.decode_one_token(torch.zeros(batch, dtype=torch.long, device=device))
        step_peak = None
        if cuda:
            sync(device)
            step_peak = torch.cuda.max_memory_allocated(device) - base
        return dict(cache_measured=cache_measured, step_peak=step_peak, measured_with="torch.cuda" if cuda else
                    "HybridCache.nbytes (CPU)")
    finally:
        del gen


def run_memory(base_config, contexts, variants=VARIANTS, batch: int = 1, dtype=torch.bfloat16, device=None,
               max_seconds: float | None = None, out_dir="benchmarks/results", name: str = "cache_memory") -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    deadline = Deadline(max_seconds)
    configs = variant_configs(base_config, variants)
    points = []
    for vname, cfg in configs.items():
        model = build_model(cfg, device, dtype)
        for ctx in contexts:
            report = memory_report(cfg, ctx, batch, _DTYPE_NAME[dtype])
            plan = plan_memory(cfg, dtype, batch, ctx, chunk_size=256)
            point = dict(model=vname, context=ctx, batch=batch, predicted_kv=report["kv_cache"],
                         predicted_mamba_state=report["mamba_state"],
                         predicted_cache=report["kv_cache"] + report["mamba_state"],
                         planner_cache=plan.kv_cache + plan.mamba_state, planner_decode_workspace=plan.decode_workspace)
            if deadline.expired():
                points.append(dict(point, status="skipped: --max-seconds reached"))
                continue
            with oom_as_status(point):
                point.update(measure_cache(model, batch, ctx), status="ok")
                point["measured_over_predicted"] = point["cache_measured"] / max(point["predicted_cache"], 1)
            free_memory(device)
            points.append(point)
            if point["status"] == "ok":
                print(f"{vname:<12} ctx {fmt_tokens(ctx):>6}  cache measured {point['cache_measured'] / 2**30:8.3f} GiB  "
                      f"predicted {point['predicted_cache'] / 2**30:8.3f} GiB", flush=True)
            else:
                print(f"{vname:<12} ctx {fmt_tokens(ctx):>6}  {point['status']}", flush=True)
        del model
        free_memory(device)
    result = dict(benchmark="cache memory vs context", dtype=str(dtype), device=str(device), batch=batch,
                  points=points, elapsed_s=deadline.elapsed,
                  variants={k: dict(schedule=c.schedule(), params=c.param_counts()) for k, c in configs.items()})
    write_json(out_dir, name, result)
    plot_memory(result, out_dir, name)
    return result


def plot_memory(result: dict, out_dir, name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, model in enumerate(result["variants"]):
        pts = [p for p in result["points"] if p["model"] == model and p.get("status") == "ok"]
        if not pts:
            continue
        color = f"C{i}"
        ax.plot([p["context"] for p in pts], [p["cache_measured"] / 2 ** 30 for p in pts], marker="o", color=color,
                label=f"{model} measured")
        ax.plot([p["context"] for p in pts], [p["predicted_cache"] / 2 ** 30 for p in pts], ls="--", color=color,
                label=f"{model} predicted")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache memory (GiB)")
    ax.set_title(f"Cache memory, batch {result['batch']}, {result['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}.png", dpi=120)
    plt.close(fig)
