"""Training checkpoints: atomic, keep-last-N, tensors in safetensors and the rest in JSON (no pickle).

    out_dir/checkpoints/step_00000100/
        model.safetensors       full parameters (names as in the plain model, experts unsharded)
        optimizer.safetensors   full optimizer state tensors; optimizer.json its param groups and scalars
        rng.safetensors         torch CPU / CUDA generator states (uint8) and numpy's key (as int64)
        trainer_state.json      step, tokens, data position, python/numpy RNG scalars, config
        tokenizer.json
    out_dir/checkpoints/latest  the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, every file and the directory are fsync'ed, and only
then is it renamed into place (os.replace) and `latest` replaced (write, fsync, os.replace). A crash at
any moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import _fsync

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Prefixes that wrappers (torch.compile, activation checkpointing, FSDP) add to parameter names.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _fsync_dir(path: str) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems do not allow fsync on a directory
        pass


def write_text_atomic(path: str, text: str) -> None:
    """Write a temporary file, fsync it, rename it over `path`, fsync the directory: readers see the old
    content or the new, never a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted: leave `path` as it was and no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def clean_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under their plain model names, each tensor once (tied weights keep the
    first name), contiguous and on the CPU."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[clean_name(name)] = t.detach().to("cpu").contiguous()
    return out


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (plain names) into `model`, whatever wrapper names it has; every parameter must be given
    (a tied weight may be given under either name)."""
    state = model.state_dict()
    missing = []
    with torch.no_grad():
        for name, target in state.items():
            plain = clean_name(name)
            src = tensors.get(plain)
            if src is None and plain.endswith("lm_head.weight"):
                src = tensors.get(plain.replace("lm_head.weight", "model.embed_tokens.weight"))
            if src is None:
                missing.append(plain)
                continue
            target.copy_(src)
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random generator the run touches: torch (CPU and each CUDA device), numpy, python."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, gauss = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(py_state), "gauss": gauss}}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Writes, lists, prunes and finds checkpoints under `<out_dir>/checkpoints`."""

    def __init__(self, out_dir: str, keep_last: int = 3):
        self.root = os.path.join(out_dir, "checkpoints")
        self.keep_last = keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def latest(self) -> str | None:
        """The newest complete checkpoint directory, or None."""
        pointer = os.path.join(self.root, LATEST)
        if not os.path.exists(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(self.root, name)
        if not os.path.exists(os.path.join(path, "trainer_state.json")):
            raise FileNotFoundError(f"{pointer} names {name}, which is not a complete checkpoint")
        return path

    def begin(self, step: int) -> str:
        """A fresh temporary directory to write the checkpoint of `step` into."""
        os.makedirs(self.root, exist_ok=True)
        tmp = os.path.join(self.root, f".tmp_step_{step:08d}")
        if os.path.exists(tmp):  # left by a crash mid-write
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        return tmp

    def commit(self, tmp: str, step: int) -> str:
        """fsync `tmp`, move it into place, point `latest` at it, prune old checkpoints."""
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync_dir(tmp)
        final = self.path(step)
        if os.path.exists(final):  # the same step saved again (e.g. after a resume): move the old one aside
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        write_text_atomic(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
        self.prune(keep=os.path.basename(final))
        return final

    def steps(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        return sorted(int(m.group(1)) for n in os.listdir(self.root) if (m := _STEP_DIR.match(n)))

    def prune(self, keep: str) -> None:
        for step in self.steps()[:-self.keep_last]:
            if os.path.basename(self.path(step)) != keep:
                shutil.rmtree(self.path(step), ignore_errors=True)


def save_checkpoint(manager: CheckpointManager, step: int, model, optimizer, trainer_state: dict,
                    tokenizer_path: str | None = None, dist=None) -> str | None:
    """Write one checkpoint atomically; returns its directory on the main rank (None elsewhere).

    Model and optimizer go through openjamba.train.distributed.save_distributed_state, which gathers full
    (unsharded) tensors from every rank, so one format serves every world size: a run saved by N processes
    resumes in M. Collective: every rank calls it; the main rank writes all files and commits.
    """
    from . import distributed

    dist = dist or distributed.DistInfo()
    tmp = os.path.join(manager.root, f".tmp_step_{step:08d}")
    if dist.is_main:
        manager.begin(step)
    distributed.barrier(dist)  # the directory exists before any rank writes into it
    distributed.save_distributed_state(model, optimizer, tmp, dist)
    if not dist.is_main:
        distributed.barrier(dist)  # wait for the main rank to commit
        return None
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({**trainer_state, "rng": rng_meta}, f, indent=1)
    if tokenizer_path and os.path.exists(tokenizer_path):
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
    final = manager.commit(tmp, step)
    distributed.barrier(dist)
    return final


def load_checkpoint(path: str, model, optimizer, dist=None, restore_rng: bool = True) -> dict:
    """Restore model, optimizer and RNG states from `path`; returns the trainer state (step, data position...)."""
    from . import distributed

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    distributed.load_distributed_state(model, optimizer, path, dist or distributed.DistInfo())
    if optimizer is not None:
        for group in optimizer.param_groups:  # JSON turned the betas tuple into a list
            group["betas"] = tuple(group["betas"])
    if restore_rng:
        set_rng_state(load_file(os.path.join(path, "rng.safetensors")), state["rng"])
    return state
