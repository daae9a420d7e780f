"""Shared pieces of the benchmarks: model variants of equal active size, timing, results files, plots.

Benchmarks never assert: they measure, record every point (including the ones that ran out of memory or
time) in a JSON file, and draw a PNG when matplotlib is installed (`pip install openjamba[plots]`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from ..config import JambaConfig
from ..model import JambaForCausalLM

logger = logging.getLogger("openjamba.bench")

# The H200 copy bandwidth measured in ../shared anchors (bytes read + written per second): the roofline that
# decode throughput is compared against.
PEAK_BANDWIDTH = 4.27e12
VARIANTS = ("jamba", "transformer", "mamba")


def parse_list(text: str, kind=int) -> list:
    """'1K,4K,1M' -> [1024, 4096, 1048576] (K = 1024, M = 1024^2) for ints; plain split for strings."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if kind is int:
            mult = {"k": 1024, "m": 1024 ** 2}.get(part[-1].lower(), 1)
            out.append(int(part[:-1] if mult > 1 else part) * mult)
        else:
            out.append(kind(part))
    return out


def _with_ffn(cfg: JambaConfig, target_active: int) -> JambaConfig:
    """cfg with the intermediate size (multiple of 64) whose active parameter count is nearest the target."""
    best = None
    for F in range(64, 8 * cfg.intermediate_size + 1, 64):
        c = cfg.replace(intermediate_size=F)
        gap = abs(c.param_counts()["active"] - target_active)
        if best is None or gap < best[0]:
            best = (gap, c)
    return best[1]


def variant_configs(base: JambaConfig, names=VARIANTS) -> dict[str, JambaConfig]:
    """Jamba (base layout), a pure Transformer (every layer attention) and a pure Mamba model (no attention
    layer: period L+1, offset L), all with the same MoE schedule and widths; the FFN width of the other two
    is adjusted so every model has the base's active parameter count per token."""
    L = base.num_hidden_layers
    target = base.param_counts()["active"]
    out = {}
    for name in names:
        if name == "jamba":
            out[name] = base
        elif name == "transformer":
            out[name] = _with_ffn(base.replace(attn_layer_period=1, attn_layer_offset=0), target)
        elif name == "mamba":
            out[name] = _with_ffn(base.replace(attn_layer_period=L + 1, attn_layer_offset=L), target)
        else:
            raise ValueError(f"unknown model variant {name!r}; choose from {VARIANTS}")
    return out


def build_model(config: JambaConfig, device, dtype) -> JambaForCausalLM:
    """Random weights, built directly on the device (initialising ~1B parameters on a CPU takes long)."""
    with torch.device(device):
        model = JambaForCausalLM(config)
    return model.to(dtype).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@contextlib.contextmanager
def oom_as_status(point: dict):
    """Run one benchmark point: running out of device memory sets point["status"] = "out of memory" (the
    point is recorded, the benchmark goes on); any other error propagates."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not is_oom(e):
            raise
        point["status"] = "out of memory"


class Deadline:
    """A wall-clock budget for a whole benchmark: points after it are recorded as skipped, not run."""

    def __init__(self, max_seconds: float | None):
        self.start = time.perf_counter()
        self.max_seconds = max_seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.max_seconds is not None and self.elapsed > self.max_seconds


def machine() -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), host=platform.node(),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        info["cuda"] = torch.version.cuda
    return info


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def profile_kernels(fn, top: int, repeats: int = 1) -> dict:
    """Run fn() `repeats` times under torch.profiler (CUDA kernels) and synchronise; per call: GPU kernel
    milliseconds and kernel launches, plus the kinds of kernel and the `top` kinds by summed time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels)
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {"gpu_ms": total / 1e3 / repeats, "launches": sum(e.count for e in kernels) / repeats,
            "kernels": len(kernels),
            "top": [{"name": e.key[:120], "ms": e.self_device_time_total / 1e3 / repeats,
                     "calls": e.count / repeats, "share": e.self_device_time_total / max(total, 1)}
                    for e in kernels[:top]]}


def write_json(out_dir, name: str, payload: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = dict(payload, machine=machine(), written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path.write_text(json.dumps(payload, indent=1, default=str))
    logger.info("wrote %s", path)
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (plots are an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the PNG (pip install 'openjamba[plots]')")
        return None
    return plt


def fmt_tokens(n: int) -> str:
    return f"{n // 1024 ** 2}M" if n >= 1024 ** 2 and n % 1024 ** 2 == 0 else (
        f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n))
