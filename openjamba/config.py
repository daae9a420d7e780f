"""JambaConfig: the transformers field names and semantics, validation, presets, schedule helpers.

A Jamba model is a stack of `num_hidden_layers` decoder layers. Each layer has a sequence mixer
(attention or Mamba) and a feed-forward block (dense SwiGLU MLP or a mixture of experts):

    layer i is attention  iff  i % attn_layer_period   == attn_layer_offset   (else Mamba)
    layer i has MoE       iff  i % expert_layer_period == expert_layer_offset (and num_experts > 1)

The field names are those of `transformers.JambaConfig`, so a released checkpoint's config.json loads
as is and ours loads in transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


@dataclass
class JambaConfig:
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336  # width of every SwiGLU MLP and of each expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # grouped-query attention: heads share K/V in groups
    attn_layer_period: int = 8  # 1 attention layer in 8: the paper's a:m = 1:7
    attn_layer_offset: int = 4
    expert_layer_period: int = 2  # MoE replaces the MLP every other layer
    expert_layer_offset: int = 1
    num_experts: int = 16
    num_experts_per_tok: int = 2
    mamba_d_state: int = 16  # N: SSM state per channel
    mamba_d_conv: int = 4  # causal depthwise conv width
    mamba_expand: int = 2  # E: Mamba inner width = E * hidden_size
    mamba_dt_rank: int | str = "auto"  # "auto" = ceil(hidden_size / 16)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rms_norm_eps: float = 1e-6
    router_aux_loss_coef: float = 1e-3
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 262144  # informational: no positional encoding, no hard limit
    # Unknown config.json fields (sliding_window, use_mamba_kernels, ...) kept and written back.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mamba_dt_rank == "auto" and type(self.hidden_size) is int:
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "attn_layer_period", "expert_layer_period", "num_experts",
            "num_experts_per_tok", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config field {name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"config field {name} must be positive, got {value}")
        for name, period in (("attn_layer_offset", "attn_layer_period"),
                             ("expert_layer_offset", "expert_layer_period")):
            offset = getattr(self, name)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ConfigError(f"config field {name} must be a non-negative integer, got {offset!r}")
            if offset >= getattr(self, period):
                raise ConfigError(
                    f"config field {name} ({offset}) must be smaller than {period} ({getattr(self, period)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config field num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"config field num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                f"num_experts ({self.num_experts})")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError(f"config field rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not isinstance(self.router_aux_loss_coef, (int, float)) or self.router_aux_loss_coef < 0:
            raise ConfigError(
                f"config field router_aux_loss_coef must be a non-negative number, got {self.router_aux_loss_coef!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config field hidden_act must be 'silu' (Jamba's SwiGLU), got {self.hidden_act!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ConfigError(f"config field {name} ({value}) is outside the vocabulary (0..{self.vocab_size - 1})")

    # ------------------------------------------------------------------ schedule
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_inner_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def layers_block_type(self) -> list[str]:
        """'attention' or 'mamba' for each layer."""
        return ["attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
                for i in range(self.num_hidden_layers)]

    @property
    def layers_num_experts(self) -> list[int]:
        """Experts per layer: num_experts on MoE layers, 1 (a dense MLP) elsewhere."""
        return [self.num_experts if i % self.expert_layer_period == self.expert_layer_offset else 1
                for i in range(self.num_hidden_layers)]

    def is_attention(self, i: int) -> bool:
        return self.layers_block_type[i] == "attention"

    def is_moe(self, i: int) -> bool:
        return self.layers_num_experts[i] > 1

    @property
    def attention_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layers_block_type) if t == "attention"]

    @property
    def mamba_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layers_block_type) if t == "mamba"]

    def schedule(self) -> str:
        """One letter pair per layer: mixer (A attention / M mamba) and FFN (e MoE / d dense)."""
        return " ".join(("A" if self.is_attention(i) else "M") + ("e" if self.is_moe(i) else "d")
                        for i in range(self.num_hidden_layers))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d["model_type"] = "jamba"
        d["architectures"] = ["JambaForCausalLM"]
        d["num_local_experts"] = self.num_experts  # older transformers read this alias
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JambaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a Jamba config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", "jamba") != "jamba":
            raise ConfigError(f"config field model_type must be 'jamba', got {d['model_type']!r}")
        if "num_experts" not in d and "num_local_experts" in d:
            d["num_experts"] = d["num_local_experts"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items()
                 if k not in names and k not in ("model_type", "architectures", "num_local_experts", "extra")}
        if known.get("num_key_value_heads") is None and "num_attention_heads" in known:
            known["num_key_value_heads"] = known["num_attention_heads"]
        return cls(**known, extra=extra)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "JambaConfig":
        path = os.path.join(directory, "config.json") if os.path.isdir(directory) else str(directory)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except TypeError as e:  # wrong value types reaching the dataclass
            raise ConfigError(f"{path}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "JambaConfig":
        """A named preset (see PRESETS), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls(**d)

    def replace(self, **overrides: Any) -> "JambaConfig":
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(overrides)
        return JambaConfig(**d)

    # ------------------------------------------------------------------ accounting
    def param_counts(self) -> dict[str, int]:
        """Parameter counts from the shapes alone (no tensors are made).

        `total` counts every parameter; `active` counts those a token touches: all experts'
        weights are replaced by `num_experts_per_tok` experts' worth.
        """
        H, I, V = self.hidden_size, self.intermediate_size, self.vocab_size
        Di, N, R, K = self.mamba_inner_size, self.mamba_d_state, self.mamba_dt_rank, self.mamba_d_conv
        kv = self.num_key_value_heads * self.head_dim
        attn = H * H * 2 + 2 * H * kv
        mamba = (2 * Di * H + Di * K + (Di if self.mamba_conv_bias else 0) + Di * (R + 2 * N)
                 + Di * R + Di + Di * N + Di + H * Di + R + 2 * N)
        if self.mamba_proj_bias:
            mamba += 2 * Di + H
        mlp = 3 * H * I
        counts = {"embedding": V * H, "lm_head": 0 if self.tie_word_embeddings else V * H,
                  "attention": 0, "mamba": 0, "mlp": 0, "experts": 0, "router": 0, "norms": H}
        active_experts = 0
        for i in range(self.num_hidden_layers):
            counts["norms"] += 2 * H
            counts["attention" if self.is_attention(i) else "mamba"] += attn if self.is_attention(i) else mamba
            if self.is_moe(i):
                counts["experts"] += self.num_experts * mlp
                counts["router"] += self.num_experts * H
                active_experts += self.num_experts_per_tok * mlp
            else:
                counts["mlp"] += mlp
        total = sum(counts.values())
        counts["total"] = total
        counts["active"] = total - counts["experts"] + active_experts
        return counts

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        """K and V of every attention layer for `context` tokens."""
        return (len(self.attention_layer_ids) * 2 * self.num_key_value_heads * self.head_dim
                * context * batch * bytes_per_value)

    def mamba_state_bytes(self, batch: int = 1, bytes_per_value: int = 2) -> int:
        """Conv state (in the model dtype) and SSM state (fp32) of every Mamba layer: constant in context."""
        per_layer = self.mamba_inner_size * ((self.mamba_d_conv - 1) * bytes_per_value + self.mamba_d_state * 4)
        return len(self.mamba_layer_ids) * per_layer * batch


# The published shapes, and small hybrids with the same 1:7 / MoE-every-other-layer layout.
PRESETS: dict[str, dict[str, Any]] = {
    "jamba-v0.1": dict(),  # the defaults are Jamba-v0.1: 52B total / 12B active
    "jamba-1.5-mini": dict(),  # same shape as v0.1 (released with 256K context)
    "jamba-1.5-large": dict(hidden_size=8192, intermediate_size=24576, num_hidden_layers=72,
                            num_attention_heads=64, num_key_value_heads=8),
    # The configuration measured in ../anchors: 789M total / 373M active.
    "jamba-1b": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=4, num_experts=8, mamba_dt_rank=64,
                     max_position_embeddings=1048576),
    "jamba-100m": dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, num_experts=8, mamba_dt_rank=32,
                       max_position_embeddings=1048576),
    "jamba-10m": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, mamba_dt_rank=16,
                      max_position_embeddings=1048576),
    # For tests: every kind of layer in 4 layers, small enough for milliseconds on a CPU.
    "jamba-tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2,
                       num_experts=4, mamba_d_state=8, mamba_dt_rank=4, max_position_embeddings=4096),
}
