"""TrainConfig: every knob of a training run, loaded from TOML with `section.key=value` overrides.

A run file has one table per section, each mapping onto a dataclass below:

    [model]  preset = "jamba-10m"            # plus any JambaConfig field as an override
    [data]   train = "data/stdlib"           # a directory written by `openjamba data prepare`
    [optim]  lr = 3e-4 ...
    [train]  max_steps = 1000 ...
    [eval] [checkpoint] [log]

Unknown keys are errors (a typo must not silently train with a default).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs tomli (the `train` extra)
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

_NEED_TOMLI = "on Python 3.10 needs tomli: install openjamba[train] (tomli), e.g. pip install 'openjamba[train]'"


class TrainConfigError(ValueError):
    """A bad training-config value; the message names the key."""


@dataclass
class ModelSection:
    preset: str = "jamba-10m"  # a name from openjamba.config.PRESETS
    init_from: str = ""  # an HF-format directory to start from instead of random weights
    # JambaConfig field overrides, e.g. {hidden_size = 128}; vocab_size defaults to the tokenizer's.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    train: str = ""  # directory from `openjamba data prepare` (split "train" is read)
    val: str = ""  # defaults to the same directory's "val" split
    tokenizer: str = ""  # tokenizer.json; defaults to the one stored in the data directory
    seq_len: int = 512
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    shuffle: bool = True  # reshuffle the packed windows every epoch (documents are shuffled at prepare time)


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # embeddings/lm_head usually take no decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured)
    fused: str = "auto"  # AdamW implementation: "auto", "triton", "true" (torch fused), "false"; see train/optim.py


@dataclass
class TrainSection:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    max_seconds: float = 0.0  # stop (with a final checkpoint) after this much wall time; 0 = no limit
    seed: int = 0
    # torch's deterministic algorithms, strict (bit-identical GPU runs; slower: e.g. the selective-scan
    # backward then sums dB/dC per channel block instead of by atomic adds; an op without a deterministic
    # implementation is an error)
    deterministic: bool = False
    device: str = "auto"  # "auto" = cuda if available else cpu
    # "auto" (bf16 autocast on CUDA, fp32 on CPU), "autocast", "bf16", "fp32"; under FSDP2, "autocast" and
    # "bf16" gather parameters in bf16 and reduce gradients in fp32
    precision: str = "auto"
    compile: bool = False
    # one CUDA graph for each step's forward + backward + gradient clipping, replayed (single GPU only):
    # no per-kernel launch cost; the first steps run eagerly (warm-up), then the step is captured
    cuda_graph: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = True  # used when launched with torchrun (world size > 1)
    expert_parallel: int = 1  # ranks per expert-parallel group
    activation_loss_coef: float = 0.0  # Jamba-1.5 activation loss; ~1e-5 in the paper
    nan_policy: str = "stop"  # "stop" or "skip" (skip the update, stop after nan_max_skips in a row)
    nan_max_skips: int = 10
    sample_prompt: str = "def "  # a sample is generated from this at the end (empty: none)
    sample_tokens: int = 64
    export: bool = True  # write the final model in HF format to out_dir/hf


@dataclass
class EvalSection:
    interval: int = 200  # steps between validation passes; 0 = only at the end
    steps: int = 20  # validation micro-batches per pass


@dataclass
class CheckpointSection:
    interval: int = 500  # steps between checkpoints; 0 = only the final one
    keep_last: int = 3


@dataclass
class LogSection:
    interval: int = 10  # steps between metric lines
    tensorboard: bool = True  # used only when the `tensorboard` package is importable
    progress: bool = True  # tqdm progress bar on the main rank


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def validate(self) -> None:
        checks = [
            (self.data.seq_len > 0, "data.seq_len must be positive"),
            (self.data.batch_size > 0, "data.batch_size must be positive"),
            (self.data.grad_accum > 0, "data.grad_accum must be positive"),
            (self.optim.lr > 0, "optim.lr must be positive"),
            (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (self.optim.fused in ("auto", "triton", "true", "false"),
             "optim.fused must be auto, triton, true or false"),
            (self.train.max_steps > 0, "train.max_steps must be positive"),
            (self.train.precision in ("auto", "autocast", "bf16", "fp32"),
             "train.precision must be auto, autocast, bf16 or fp32"),
            (self.train.nan_policy in ("stop", "skip"), "train.nan_policy must be stop or skip"),
            (self.train.expert_parallel >= 1, "train.expert_parallel must be >= 1"),
            (self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
            (self.log.interval >= 1, "log.interval must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        cfg = cls()
        for section_name, values in d.items():
            section = _section(cfg, section_name)
            if not isinstance(values, dict):
                raise TrainConfigError(f"[{section_name}] must be a table, got {values!r}")
            for key, value in values.items():
                _set(cfg, section, section_name, key, value)
        cfg.validate()
        return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: TrainConfig) -> str:
    """The config as a TOML run file that `load_config` reads back to an equal config."""
    lines = []
    for section_name, values in cfg.to_dict().items():
        lines.append(f"[{section_name}]")
        for key, value in values.items():
            if key == "overrides":  # [model] overrides are written as plain [model] keys
                lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _section(cfg: TrainConfig, name: str):
    if name not in {f.name for f in dataclasses.fields(cfg)}:
        raise TrainConfigError(f"unknown config section [{name}]; sections: "
                               f"{', '.join(f.name for f in dataclasses.fields(cfg))}")
    return getattr(cfg, name)


def _set(cfg, section, section_name: str, key: str, value: Any) -> None:
    """Set one key, checking it exists and coercing ints to floats where a float is expected."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    if section_name == "model" and key not in fields:
        # Any other [model] key is a JambaConfig field override (validated when the model is built).
        section.overrides[key] = value
        return
    if key not in fields:
        raise TrainConfigError(f"unknown key {section_name}.{key}; keys: {', '.join(fields)}")
    current = getattr(section, key)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise TrainConfigError(f"{section_name}.{key} must be true or false, got {value!r}")
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, dict):
        if not isinstance(value, dict):
            raise TrainConfigError(f"{section_name}.{key} must be a table, got {value!r}")
        value = {**current, **value}
    elif type(value) is not type(current):
        raise TrainConfigError(f"{section_name}.{key} must be a {type(current).__name__}, got {value!r}")
    setattr(section, key, value)


def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, quoted strings, arrays); bare words stay strings."""
    if tomllib is None:
        raise TrainConfigError(f"reading --set values {_NEED_TOMLI}")
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings (from `--set`) in order."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise TrainConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        section_name, key = dotted.strip().split(".", 1)
        _set(cfg, _section(cfg, section_name), section_name, key, parse_value(text.strip()))
    cfg.validate()
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML run file (or start from the defaults when path is None) and apply overrides."""
    if path is None:
        cfg = TrainConfig()
    else:
        if tomllib is None:
            raise TrainConfigError(f"reading a TOML run file {_NEED_TOMLI}")
        if not os.path.exists(path):
            raise TrainConfigError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            try:
                d = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise TrainConfigError(f"{path} is not valid TOML: {e}") from None
        cfg = TrainConfig.from_dict(d)
    return apply_overrides(cfg, list(overrides))
