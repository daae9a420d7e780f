"""Checkpoints in the Hugging Face Jamba format: config.json + safetensors, single file or sharded.

On disk (every released Jamba checkpoint, and what transformers writes by default) an MoE layer stores
one tensor per expert and projection, `model.layers.i.feed_forward.experts.j.{gate,up,down}_proj.weight`;
in memory our experts are two 3-D tensors, `experts.gate_up_proj` (X, 2F, H) with the gate rows first and
`experts.down_proj` (X, H, F). Loading accepts both the per-expert layout and the fused one (transformers
v5 with save_original_format=False); saving writes the per-expert layout that every other tool reads.
Every other tensor name is the same on disk and in memory.

Loading never holds two copies of the weights: the model is built on the `meta` device, its storage is
allocated once on the target device and dtype, and each tensor is copied in straight from its shard
(`safe_open` maps the file; one tensor at a time passes through host memory). All headers are checked
before any memory is allocated, so a mismatched checkpoint fails fast. Files are never unpickled.

dtype: when given, every parameter is stored in it, A_log and D included (as transformers does; the
model computes A = -exp(A_log) and the scan in fp32 regardless). When None, the model takes the
checkpoint's dtype: the floating dtype holding most of the parameters (all of them, for any checkpoint
written by this module or by transformers).

Saving is atomic: everything is written into a temporary sibling directory, flushed to disk, then moved
into place with os.replace, so a crash while writing leaves any previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict

import safetensors
import safetensors.torch
import torch

from .config import ConfigError, JambaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the usual Hugging Face shard size; bounds host memory when saving from GPU

_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
_DISK_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "float64": torch.float64, "double": torch.float64}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match its config; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------- helpers
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB", "500MB", "1.5GiB" (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a byte count or a string like '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size must be a byte count or a string like '2GB', got {size!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _open(path: str):
    """safe_open with the file name in any error (a truncated or corrupt header raises here)."""
    try:
        return safetensors.safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError: the message must name the file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# ---------------------------------------------------------------------------------------------- loading
def _read_config(directory: str) -> JambaConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} in the checkpoint directory")
    d = _read_json(path, "the model config")
    try:
        return JambaConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _weight_files(directory: str) -> dict[str, set[str] | None]:
    """{shard path: the tensor names the index assigns to it (None for a single unindexed file)}."""
    single, index = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, INDEX_NAME)
    if os.path.isfile(single):  # transformers also prefers the single file when both exist
        return {single: None}
    if not os.path.isfile(index):
        raise CheckpointError(f"{directory}: no weights ({WEIGHTS_NAME} or {INDEX_NAME})")
    d = _read_json(index, "the shard index")
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: the shard index has no 'weight_map' object")
    files: dict[str, set[str]] = defaultdict(set)
    for key, name in weight_map.items():
        # A shard is a plain file name beside the index: never a path that leaves the directory.
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index}: tensor {key} maps to an invalid shard name {name!r}")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index}: tensor {key} is in shard {name}, which does not exist")
        files[path].add(key)
    return dict(files)


class _Plan:
    """Where each tensor on disk goes in the model, checked against the model's shapes before loading."""

    def __init__(self, model, source: str):
        self.source = source  # model.safetensors or the shard index: where a missing tensor should have been
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.tied = model.config.tie_word_embeddings
        if self.tied:
            del self.shapes["lm_head.weight"]  # the embedding; on disk it may be absent
        self.copies: dict[str, list] = defaultdict(list)  # file -> [(key, param, index)]
        self.covered: dict[str, set] = defaultdict(set)  # param -> units loaded ("all" or (kind, expert))
        self.numel: Counter = Counter()  # disk dtype -> elements, to choose the dtype when none is given
        self.tied_head: tuple[str, str] | None = None  # (file, key) of an lm_head.weight kept while tied

    def add_file(self, path: str, expected: set[str] | None) -> None:
        with _open(path) as f:
            keys = list(f.keys())
            absent = sorted(expected - set(keys)) if expected is not None else []
            if absent:
                raise CheckpointError(f"{path}: tensor {absent[0]} is listed in {INDEX_NAME} but not in this shard")
            for key in keys:
                if expected is not None and key not in expected:
                    raise CheckpointError(f"{path}: unexpected tensor {key} (not listed in {INDEX_NAME})")
                try:
                    sl = f.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {key} ({e})") from None
                self._add(path, key, shape, dtype)

    def _add(self, path: str, key: str, shape: tuple, dtype: str) -> None:
        if dtype not in _DISK_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {dtype}; expected one of "
                                  f"{', '.join(_DISK_DTYPES)} (quantized checkpoints are not supported)")
        m = _EXPERT_RE.match(key)
        if m:
            prefix, j, kind = m.group(1), int(m.group(2)), m.group(3)[: -len("_proj")]
            param = prefix + (".down_proj" if kind == "down" else ".gate_up_proj")
            if param not in self.shapes:
                raise CheckpointError(f"{path}: unexpected tensor {key} (that layer has no mixture of experts)")
            X, rows, cols = self.shapes[param]
            if j >= X:
                raise CheckpointError(f"{path}: tensor {key}: expert index {j} is out of range "
                                      f"(the config has num_experts={X})")
            if kind == "down":
                index, want = (j,), (rows, cols)
            else:
                F = rows // 2
                index, want = (j, slice(0, F) if kind == "gate" else slice(F, 2 * F)), (F, cols)
            unit = (kind, j)
        elif key in self.shapes:
            param, index, want, unit = key, None, self.shapes[key], "all"
        elif self.tied and key == "lm_head.weight":
            self._check_shape(path, key, shape, self.shapes["model.embed_tokens.weight"])
            self.tied_head = (path, key)
            return
        else:
            raise CheckpointError(f"{path}: unexpected tensor {key} (no such parameter in a model of this config)")
        self._check_shape(path, key, shape, want)
        done = self.covered[param]
        if unit in done or (unit == "all" and done) or "all" in done:
            raise CheckpointError(f"{path}: tensor {key} is stored twice (or in both the fused and the "
                                  f"per-expert layout)")
        done.add(unit)
        self.copies[path].append((key, param, index))
        self.numel[dtype] += int(torch.Size(shape).numel())

    @staticmethod
    def _check_shape(path, key, shape, want) -> None:
        if tuple(shape) != tuple(want):
            raise CheckpointError(f"{path}: tensor {key} has shape {list(shape)}, the config expects {list(want)}")

    def check_complete(self) -> None:
        missing = []
        for param, shape in self.shapes.items():
            done = self.covered.get(param, set())
            if "all" in done:
                continue
            if param.endswith(_FUSED_SUFFIXES):
                prefix = param.rsplit(".", 1)[0]
                kinds = ("down",) if param.endswith("down_proj") else ("gate", "up")
                missing += [f"{prefix}.{j}.{k}_proj.weight" for j in range(shape[0]) for k in kinds
                            if (k, j) not in done]
            else:
                missing.append(param)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.source}: missing tensor(s) {', '.join(missing[:5])}{more}")

    def dtype(self) -> torch.dtype:
        return _DISK_DTYPES[self.numel.most_common(1)[0][0]] if self.numel else torch.float32


def load_pretrained(directory, dtype=None, device=None):
    """Load a JambaForCausalLM from `directory` (config.json + model.safetensors or sharded safetensors).

    dtype: torch dtype (or its name) for every parameter; None keeps the checkpoint's dtype.
    device: where the parameters live (default CPU). A tokenizer.json beside the weights is loaded
    into `model.tokenizer` (and tokenizer_config.json, if present, into `model.tokenizer_config`).
    Raises CheckpointError naming the file and tensor for anything missing, corrupt or mismatched.
    """
    from .model import JambaForCausalLM

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise CheckpointError(f"{directory}: checkpoint directory {what}")
    dtype = _resolve_dtype(dtype)
    config = _read_config(directory)
    files = _weight_files(directory)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = JambaForCausalLM(config)
    single = os.path.join(directory, WEIGHTS_NAME)
    plan = _Plan(model, single if single in files else os.path.join(directory, INDEX_NAME))
    for path, expected in files.items():
        plan.add_file(path, expected)
    plan.check_complete()

    model.to(dtype or plan.dtype())
    model.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    model.tie_weights()  # to_empty gave every parameter new storage, which unties shared ones
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for path, copies in plan.copies.items():
            with _open(path) as f:
                for key, param, index in copies:
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:
                        raise CheckpointError(f"{path}: cannot read tensor {key} ({e})") from None
                    target = params[param] if index is None else params[param][index]
                    target.copy_(tensor)
                    del tensor
        if plan.tied_head is not None:  # tied but also stored: it must be the embedding, not a lost head
            path, key = plan.tied_head
            with _open(path) as f:
                head = f.get_tensor(key).to(device=model.device, dtype=model.dtype)
            if not torch.equal(head, model.model.embed_tokens.weight):
                raise CheckpointError(f"{path}: tensor {key} differs from model.embed_tokens.weight but the "
                                      f"config sets tie_word_embeddings=true")
    _load_tokenizer(model, directory)
    return model.eval()


def _load_tokenizer(model, directory: str) -> None:
    path = os.path.join(directory, TOKENIZER_NAME)
    if not os.path.isfile(path):
        return
    from tokenizers import Tokenizer

    try:
        model.tokenizer = Tokenizer.from_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({e})") from None
    cfg_path = os.path.join(directory, TOKENIZER_CONFIG_NAME)
    if os.path.isfile(cfg_path):
        cfg = _read_json(cfg_path, "the tokenizer config")
        if isinstance(cfg, dict):  # kept so that save_pretrained writes the same settings back
            model.tokenizer_config = cfg


# ---------------------------------------------------------------------------------------------- saving
def _disk_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) in the per-expert disk layout, in module order; views, no copies."""
    tied = model.config.tie_word_embeddings
    if tied and not (model.lm_head.weight is model.model.embed_tokens.weight
                     or torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)):
        raise CheckpointError("config.tie_word_embeddings is true but lm_head.weight is not the embedding: "
                              "saving would lose the head")
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # tied: the embedding is the head, as transformers writes it
        if name.endswith(_FUSED_SUFFIXES):
            prefix = name.rsplit(".", 1)[0]
            if name.endswith("gate_up_proj"):
                F = t.shape[1] // 2
                for j in range(t.shape[0]):
                    out.append((f"{prefix}.{j}.gate_proj.weight", t[j, :F]))
                    out.append((f"{prefix}.{j}.up_proj.weight", t[j, F:]))
            else:
                out += [(f"{prefix}.{j}.down_proj.weight", t[j]) for j in range(t.shape[0])]
        else:
            out.append((name, t))
    return out


def _shards(tensors, limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Greedy split in module order; a tensor larger than the limit gets a shard of its own."""
    shards, size = [[]], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _special_ids(config) -> dict[str, int]:
    eos = config.eos_token_id
    if isinstance(eos, list):  # several end tokens: the first is the one a tokenizer names
        eos = eos[0] if eos else None
    return {k: v for k, v in (("bos", config.bos_token_id), ("eos", eos), ("pad", config.pad_token_id))
            if isinstance(v, int)}


def save_pretrained(model, directory, max_shard_size: int | str | None = None) -> None:
    """Write `model` to `directory` in the Hugging Face Jamba format, per-expert MoE layout.

    Writes config.json, generation_config.json (bos/eos/pad ids), model.safetensors or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json when the weights exceed
    max_shard_size (int bytes or "2GB"/"500MB"; None means 5GB), and, when `model.tokenizer` is set,
    tokenizer.json + tokenizer_config.json (loadable by transformers' AutoTokenizer). Other files in an
    existing directory are kept; weight files of an earlier checkpoint there are replaced or removed.
    """
    directory = os.path.abspath(os.fspath(directory))
    limit = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: exists and is not a directory")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    # The staging directory is a sibling, so the final moves are renames within one file system.
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        names = _write_weights(model, stage, limit)
        config = model.config.to_dict()
        config["dtype"] = str(model.dtype).removeprefix("torch.")  # transformers' dtype="auto" reads it
        config.pop("torch_dtype", None)
        _write_json(os.path.join(stage, CONFIG_NAME), config)
        ids = _special_ids(model.config)
        _write_json(os.path.join(stage, GENERATION_CONFIG_NAME),
                    {"_from_model_config": True, **{f"{k}_token_id": v for k, v in ids.items()}})
        names += [CONFIG_NAME, GENERATION_CONFIG_NAME]
        if getattr(model, "tokenizer", None) is not None:
            names += _write_tokenizer(model, stage, ids)
        for name in names:
            _fsync(os.path.join(stage, name))
        _commit(stage, directory, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already after a clean commit


def _write_weights(model, stage: str, limit: int) -> list[str]:
    shards = _shards(_disk_tensors(model), limit)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        # One shard at a time on the host: a GPU model never has more than a shard copied out.
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in shard}
        safetensors.torch.save_file(tensors, os.path.join(stage, name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    if n > 1:
        _write_json(os.path.join(stage, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
        names.append(INDEX_NAME)
    return names


def _write_tokenizer(model, stage: str, ids: dict[str, int]) -> list[str]:
    model.tokenizer.save(os.path.join(stage, TOKENIZER_NAME))
    cfg = dict(getattr(model, "tokenizer_config", None) or {})
    # PreTrainedTokenizerFast builds from tokenizer.json alone; it needs the special tokens by name.
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for kind, i in ids.items():
        token = model.tokenizer.id_to_token(i)
        if token is not None:
            cfg.setdefault(f"{kind}_token", token)
    _write_json(os.path.join(stage, TOKENIZER_CONFIG_NAME), cfg)
    return [TOKENIZER_NAME, TOKENIZER_CONFIG_NAME]


def _commit(stage: str, directory: str, names: list[str]) -> None:
    """Move the staged files into `directory`. A new directory is one atomic rename; into an existing one,
    weights go first and config.json last, then weight files of the old checkpoint that the new one
    does not use are removed (a stale index or shard would shadow the new weights)."""
    if not os.path.exists(directory):
        os.replace(stage, directory)
        return
    order = sorted(names, key=lambda n: (n == CONFIG_NAME, n == INDEX_NAME))
    for name in order:
        os.replace(os.path.join(stage, name), os.path.join(directory, name))
    for name in os.listdir(directory):
        stale = name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.match(name)
        if stale and name not in names:
            os.remove(os.path.join(directory, name))
