"""Long context: prefill + decode at up to 1M tokens (peak memory, time), and a passkey check through the cache.

run_prefill: random weights and tokens; the prompt is fed in chunks through Generator.prefill (each call
continues from the cache), timing each chunk so a run that would exceed --max-seconds stops and says how
far it got. Then `new_tokens` are decoded with the graph step. Recorded: the memory plan, peak memory
(torch.cuda.max_memory_allocated), prefill time and tokens/s, decode tokens/s.

run_passkey: the constructed passkey model (inference/passkey.py) at the preset's layer layout and widths,
a key hidden near the start of a long filler prompt: the answer is right only if the attention layers see
the whole context through the chunked prefill and the decode step.
"""

from __future__ import annotations

import time

import torch

from ..inference import DoesNotFit, Generator, plan_memory
from ..inference.passkey import make_passkey_model, passkey_config, passkey_prompt
from .common import Deadline, build_model, fmt_tokens, free_memory, is_oom, oom_as_status, sync, write_json


def _prefill_timed(gen, ids, chunk: int, deadline: Deadline) -> tuple[float, int, torch.Tensor | None]:
    """Prefill `ids` chunk by chunk; returns (seconds, tokens done, last logits or None if stopped early)."""
    device = ids.device
    T = ids.shape[1]
    sync(device)
    t0 = time.perf_counter()
    logits = None
    for s in range(0, T, chunk):
        if deadline.expired():
            sync(device)
            return time.perf_counter() - t0, s, None
        logits = gen.prefill(ids[:, s:s + chunk], chunk_size=chunk)
    sync(device)
    return time.perf_counter() - t0, T, logits


def run_prefill(config, context: int, new_tokens: int = 128, batch: int = 1, chunk_size: int = 16384,
                dtype=torch.bfloat16, device=None, mode: str = "auto", max_seconds: float | None = None,
                out_dir="benchmarks/results", name: str = "long_context", step: str = "auto") -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    deadline = Deadline(max_seconds)
    result = dict(benchmark="long-context prefill + decode", context=context, batch=batch, chunk_size=chunk_size,
                  new_tokens=new_tokens, dtype=str(dtype), device=str(device), step=step,
                  config=config.to_dict())
    plan = plan_memory(config, dtype, batch, context + new_tokens, chunk_size)
    result["plan"] = dict(weights=plan.weights, kv_cache=plan.kv_cache, mamba_state=plan.mamba_state,
                          prefill_peak=plan.prefill_peak, decode_workspace=plan.decode_workspace, total=plan.total,
                          text=plan.describe())
    print(plan.describe(), flush=True)
    try:
        model = build_model(config, device, dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        gen = Generator(model, batch, context + new_tokens, mode=mode, chunk_size=chunk_size, step=step)
        ids = torch.randint(0, config.vocab_size, (batch, context), device=device)
        seconds, done, logits = _prefill_timed(gen, ids, chunk_size, deadline)
        result.update(prefill_s=seconds, prefill_tokens=done, prefill_tokens_per_s=batch * done / max(seconds, 1e-9))
        if logits is None:
            result["status"] = f"stopped by --max-seconds after {done} of {context} prompt tokens"
        else:
            tok = logits.argmax(-1)
            sync(device)
            t0 = time.perf_counter()
            new = gen.decode_n_tokens(tok, new_tokens)
            sync(device)
            dt = time.perf_counter() - t0
            result.update(decode_s=dt, decode_tokens_per_s=batch * new.shape[1] / dt, status="ok",
                          finite_logits=bool(torch.isfinite(logits).all()))
        if cuda:
            result["peak_memory"] = torch.cuda.max_memory_allocated(device)
            result["peak_over_plan"] = result["peak_memory"] / plan.total
    except DoesNotFit as e:
        result["status"] = f"does not fit: {e}"
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not is_oom(e):
            raise
        result["status"] = f"out of memory: {str(e).splitlines()[0]}"
    result["elapsed_s"] = deadline.elapsed
    free_memory(device)
    print({k: v for k, v in result.items() if k not in ("config", "plan")}, flush=True)
    write_json(out_dir, name, result)
    return result


def run_passkey(base_config, contexts, positions=(0.0, 0.5), dtype=torch.bfloat16, device=None, mode: str = "auto",
                chunk_size: int = 16384, max_seconds: float | None = None, out_dir="benchmarks/results",
                name: str = "passkey") -> dict:
    """For each context and relative key position, whether the model's first new tokens are the key."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    deadline = Deadline(max_seconds)
    cfg = passkey_config(base_config)
    with torch.device(device):
        model = make_passkey_model(build_model(cfg, device, torch.float32)).to(dtype).eval()
    key = cfg.vocab_size - 3
    points = []
    for ctx in contexts:
        gen = None
        for rel in positions:
            pos = min(int(rel * ctx), ctx - 2)
            point = dict(context=ctx, key_position=pos)
            if deadline.expired():
                points.append(dict(point, status="skipped: --max-seconds reached"))
                continue
            with oom_as_status(point):
                if gen is None:
                    gen = Generator(model, 1, ctx + 4, mode=mode, chunk_size=chunk_size)
                gen.reset()
                ids = passkey_prompt(ctx, pos, key, n_filler=cfg.vocab_size - 16).to(device)
                seconds, done, logits = _prefill_timed(gen, ids, chunk_size, deadline)
                if logits is None:
                    points.append(dict(point, status=f"stopped by --max-seconds at {done} tokens"))
                    continue
                first = logits.argmax(-1)
                new = torch.cat([first[:, None], gen.decode_n_tokens(first, 3)], 1)[0].tolist()
                point.update(status="ok", retrieved=all(t == key for t in new), tokens=new, key=key,
                             prefill_s=seconds)
            points.append(point)
            print(f"passkey ctx {fmt_tokens(ctx):>6} key at {pos:>8}: {point.get('retrieved', point['status'])}",
                  flush=True)
        del gen
        free_memory(device)
    result = dict(benchmark="passkey retrieval through the cache", dtype=str(dtype), device=str(device),
                  schedule=cfg.schedule(), points=points, elapsed_s=deadline.elapsed,
                  all_retrieved=all(p.get("retrieved") for p in points if p.get("status") == "ok"))
    write_json(out_dir, name, result)
    return result
