"""Decode throughput vs context length: Jamba vs a pure Transformer vs a pure Mamba model (Jamba paper, Fig. 3).

For each model and context length the cache is filled to `context` positions and `steps` tokens are timed
through the Generator's greedy decoding (on a GPU the CUDA graph of a block of tokens). The context is
synthetic: the cache's length is set to `context` without running a prefill. A decode step does the same
work whatever the cached values are, and skipping prefill lets one run cover 1K ... 1M tokens for three
models in a minute or two. Batch 1 and the largest batch the memory planner admits (up to
--max-batch) are measured. Each point records tokens/s, ms/step, the bytes a step must move and the
achieved fraction of the memory-bandwidth roofline.
"""

from __future__ import annotations

import time

import torch

from ..inference import DoesNotFit, Generator, device_budget, max_batch
from ..inference.engine import CHAIN
from .common import (PEAK_BANDWIDTH, VARIANTS, Deadline, build_model, fmt_tokens, free_memory, is_oom, logger,
                     pyplot, sync, variant_configs, write_json)


def step_bytes(config, batch: int, cache_length: int, nbytes: int, moe_impl: str | None) -> int:
    """Bytes one decode step must read or write: the weights it touches (dense layers, the routed experts,
    the lm_head; one embedding row), the whole attention buffer and the Mamba state (read and written)."""
    c = config.param_counts()
    mlp_e = 3 * config.hidden_size * config.intermediate_size  # one expert
    n_moe = sum(config.is_moe(i) for i in range(config.num_hidden_layers))
    X, K = config.num_experts, config.num_experts_per_tok
    experts_read = X if moe_impl == "dense" else X * (1 - (1 - K / X) ** batch)  # expected distinct experts
    weights = (c["total"] - c["experts"] - c["embedding"]) + n_moe * experts_read * mlp_e
    return (weights * nbytes + config.kv_cache_bytes(cache_length, batch, nbytes)
            + 2 * config.mamba_state_bytes(batch, nbytes))


def time_decode(model, batch: int, context: int, steps: int, mode: str, warmup: int = CHAIN, budget=None,
                step: str = "auto") -> dict:
    """Decode `steps` greedy tokens per row after a synthetic `context`-token cache, as generation does
    (`Generator.decode_n_tokens`: blocks of CHAIN tokens per graph replay); returns one point."""
    device = model.device
    gen = Generator(model, batch, context + warmup + steps + 1, mode=mode, chunk_size=256, budget=budget,
                    step=step)
    try:
        gen.cache.length = context  # synthetic context (see module docstring)
        gen.cache.sync_position()
        tok = torch.zeros(batch, dtype=torch.long, device=device)
        tok = gen.decode_n_tokens(tok, warmup)[:, -1]
        sync(device)
        t0 = time.perf_counter()
        gen.decode_n_tokens(tok, steps)
        sync(device)
        dt = time.perf_counter() - t0
        nbytes = torch.empty((), dtype=model.dtype).element_size()
        moved = step_bytes(model.config, batch, gen.max_length, nbytes, gen.moe_impl)
        return dict(tokens_per_s=batch * steps / dt, ms_per_step=1e3 * dt / steps, step_bytes=moved,
                    achieved_GBps=moved * steps / dt / 1e9, roofline_fraction=moved * steps / dt / PEAK_BANDWIDTH,
                    moe_impl=gen.moe_impl, mode=gen.mode, step=gen.step, chain=gen.chain)
    finally:
        del gen


def run_decode(base_config, contexts, variants=VARIANTS, batches=("1", "max"), steps: int = 32,
               dtype=torch.bfloat16, device=None, mode: str = "auto", max_batch_cap: int = 256,
               max_seconds: float | None = None, out_dir="benchmarks/results", name: str = "decode_throughput",
               step: str = "auto") -> dict:
    """Measure every (variant, context, batch) point; write <name>.json and <name>.png; return the results."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    deadline = Deadline(max_seconds)
    configs = variant_configs(base_config, variants)
    points = []
    for vname, cfg in configs.items():
        if deadline.expired():
            points.append(dict(model=vname, status="skipped: --max-seconds reached"))
            continue
        model = build_model(cfg, device, dtype)
        nbytes = torch.empty((), dtype=dtype).element_size()
        for ctx in contexts:
            for b in batches:
                point = dict(model=vname, context=ctx, batch_kind=b,
                             active_params=cfg.param_counts()["active"],
                             attention_layers=len(cfg.attention_layer_ids))
                if deadline.expired():
                    points.append(dict(point, status="skipped: --max-seconds reached"))
                    continue
                budget = device_budget(device) if torch.device(device).type == "cuda" else None
                if b == "max":
                    B = max_batch(cfg, dtype, ctx + CHAIN + steps + 1, budget, chunk_size=256, cap=max_batch_cap,
                                  weights_resident=False) if budget else max_batch_cap
                else:
                    B = int(b)
                point["batch"] = B
                if B == 0:
                    points.append(dict(point, status="does not fit"))
                    continue
                for attempt in range(4):  # the planner is an estimate: at 'max', back off on a real OOM
                    try:
                        point.update(time_decode(model, B, ctx, steps, mode, budget=budget, step=step), status="ok")
                        point["cache_bytes"] = cfg.kv_cache_bytes(ctx, B, nbytes) + cfg.mamba_state_bytes(B, nbytes)
                        break
                    except DoesNotFit as e:
                        point.update(status=f"does not fit: {e}")
                        break
                    except (RuntimeError, torch.OutOfMemoryError) as e:
                        if not is_oom(e):
                            raise
                        point.update(status="out of memory")
                        free_memory(device)
                        if b != "max" or B == 1:
                            break
                        B = point["batch"] = max(1, int(B * 0.7))
                        budget = None  # the planner said yes before; let the device decide now
                free_memory(device)
                points.append(point)
                logger.info("%s", {k: v for k, v in point.items() if k != "active_params"})
                print(_row(point), flush=True)
        del model
        free_memory(device)
    result = dict(benchmark="decode throughput vs context", dtype=str(dtype), device=str(device), steps=steps,
                  step=step,
                  variants={k: dict(c.to_dict(), schedule=c.schedule(), params=c.param_counts())
                            for k, c in configs.items()},
                  points=points, ratios=_ratios(points), elapsed_s=deadline.elapsed)
    write_json(out_dir, name, result)
    plot_decode(result, out_dir, name)
    return result


def _row(p) -> str:
    if p.get("status") != "ok":
        return f"{p['model']:<12} ctx {fmt_tokens(p.get('context', 0)):>6} batch {p.get('batch', '-'):>4}  {p.get('status')}"
    return (f"{p['model']:<12} ctx {fmt_tokens(p['context']):>6} batch {p['batch']:>4}  {p['tokens_per_s']:>10.1f} tok/s  "
            f"{p['ms_per_step']:7.2f} ms/step  {p['achieved_GBps']:7.0f} GB/s ({100 * p['roofline_fraction']:.0f}% of roofline)")


def _ratios(points) -> list[dict]:
    """Jamba's tokens/s over the Transformer's at each (context, batch kind) both measured."""
    ok = {(p["model"], p["context"], p["batch_kind"]): p for p in points if p.get("status") == "ok"}
    out = []
    for (m, ctx, bk), p in ok.items():
        t = ok.get(("transformer", ctx, bk))
        if m == "jamba" and t:
            out.append(dict(context=ctx, batch_kind=bk, jamba_over_transformer=p["tokens_per_s"] / t["tokens_per_s"]))
    return out


def plot_decode(result: dict, out_dir, name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    kinds = [bk for bk in ("1", "max") if any(p.get("batch_kind") == bk and p.get("status") == "ok"
                                              for p in result["points"])] or ["1"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, bk in zip(axes[0], kinds):
        for model in result["variants"]:
            pts = [p for p in result["points"] if p.get("model") == model and p.get("batch_kind") == bk
                   and p.get("status") == "ok"]
            if pts:
                ax.plot([p["context"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("batch 1" if bk == "1" else "largest batch that fits")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"Decode throughput, {result['dtype']}, equal active parameters ({result['device']})")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}.png", dpi=120)
    plt.close(fig)
