"""Inference memory accounting from shapes alone: KV cache, Mamba state, weights.

The point of Jamba's 1:7 attention-to-Mamba ratio is the KV cache: only attention layers keep per-token
state, so at 256K tokens Jamba-v0.1 needs 4 GiB where a Transformer of similar active size needs 32-128
GiB. `compare_rows` reproduces the paper's KV-cache table (Jamba paper, Table 1) with the formula

    KV bytes = 2 (K and V) x attention layers x KV heads x head dim x tokens x batch x bytes per value

applied to the published shapes of the paper's Transformer baselines and to any Jamba config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import JambaConfig

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class TransformerShape:
    """The attention shape of a published Transformer: enough to size its KV cache."""

    name: str
    attention_layers: int
    kv_heads: int
    head_dim: int
    total_params: float
    active_params: float

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        return kv_cache_bytes(self.attention_layers, self.kv_heads, self.head_dim, context, batch, bytes_per_value)


# Published configs (config.json of each release). Llama-2-7B uses full multi-head attention (32 KV
# heads); Mistral-7B and Mixtral use 8 KV heads (GQA); Llama-2-70B is GQA with 8 KV heads over 80 layers.
REFERENCE_TRANSFORMERS = (
    TransformerShape("Llama-2-7B", 32, 32, 128, 6.7e9, 6.7e9),
    TransformerShape("Mistral-7B", 32, 8, 128, 7.2e9, 7.2e9),
    TransformerShape("Mixtral-8x7B", 32, 8, 128, 46.7e9, 12.9e9),
    TransformerShape("Llama-2-70B", 80, 8, 128, 69.0e9, 69.0e9),
)


def kv_cache_bytes(attention_layers: int, kv_heads: int, head_dim: int, context: int, batch: int = 1,
                   bytes_per_value: int = 2) -> int:
    """Bytes of K and V for `context` tokens in every attention layer."""
    return 2 * attention_layers * kv_heads * head_dim * context * batch * bytes_per_value


def memory_report(config: JambaConfig, context: int, batch: int = 1, dtype: str = "bf16") -> dict[str, int]:
    """Bytes needed to serve `batch` sequences of `context` tokens with weights and caches in `dtype`.

    kv_cache grows with context; mamba_state does not (conv state in `dtype`, SSM state in fp32, as the
    HybridCache stores them); weights are every parameter (all experts are resident even if 2 are active).
    Activations are not included: with chunked prefill they are bounded by the chunk, not the context.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    nbytes = DTYPE_BYTES[dtype]
    kv = config.kv_cache_bytes(context, batch, nbytes)
    ssm = config.mamba_state_bytes(batch, nbytes)
    weights = config.param_counts()["total"] * nbytes
    return {"kv_cache": kv, "mamba_state": ssm, "weights": weights, "total": kv + ssm + weights}


def compare_rows(config: JambaConfig, name: str, context: int, batch: int = 1, dtype: str = "bf16") -> list[dict]:
    """One row per reference Transformer, then the Jamba config: shapes, parameter counts and KV bytes."""
    nbytes = DTYPE_BYTES[dtype]
    rows = [dict(name=t.name, layers=t.attention_layers, attention_layers=t.attention_layers,
                 kv_heads=t.kv_heads, head_dim=t.head_dim, total=t.total_params, active=t.active_params,
                 kv_cache=t.kv_cache_bytes(context, batch, nbytes)) for t in REFERENCE_TRANSFORMERS]
    counts = config.param_counts()
    rows.append(dict(name=name, layers=config.num_hidden_layers, attention_layers=len(config.attention_layer_ids),
                     kv_heads=config.num_key_value_heads, head_dim=config.head_dim, total=counts["total"],
                     active=counts["active"], kv_cache=config.kv_cache_bytes(context, batch, nbytes)))
    return rows


# ---------------------------------------------------------------------------------------------- formatting
def format_bytes(n: float, decimals: int = 1) -> str:
    """Binary units: 4294967296 -> '4.0 GiB' (decimals=2: '4.00 GiB')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.{decimals}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: float) -> str:
    """Decimal units as parameter counts are quoted: 51570323328 -> '51.6B'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def parse_tokens(text: str) -> int:
    """A token count: '262144', '256K' / '256k' (x1024) or '1M' (x1024^2), as context lengths are quoted."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ValueError(f"expected a positive token count such as 262144, 256K or 1M, got {text!r}")
    value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"expected a positive token count, got {text!r}")
    return value
