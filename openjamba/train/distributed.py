"""Distributed training: process-group setup, parallelism applied from outside, full-state checkpoints.

The model code is single-device. `parallelize` wraps an ordinary `JambaForCausalLM` in a fixed order:

    1. activation checkpointing per decoder layer,
    2. torch.compile per decoder layer,
    3. expert parallelism (experts of every MoE layer split over an "ep" group, all-to-all dispatch;
       see expert_parallel.py),
    4. FSDP2 `fully_shard` per decoder layer and on the root.

Device mesh: world = dp * ep, laid out (dp, ep) so the ranks of one EP group are neighbours (on one host
they share NVLink). Non-expert parameters are sharded over all `world` ranks; expert parameters, already
split over "ep", are sharded over "dp" only. Every gradient ends up as the mean over all ranks of the
per-rank loss gradients, so a run on N ranks with a global batch split N ways follows the
single-process run that averages the N per-shard losses.

Checkpoints (`save_distributed_state`) hold the ordinary single-device layout (full experts), so they
load at any world size and expert-parallel degree; they are safetensors plus JSON, no pickle.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor

from .. import ops
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel, ep_modules

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
_FORMAT = "openjamba-distributed-state-v1"


@dataclass
class DistInfo:
    """Where this process sits. `device` is the device its model and batches go to."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main: bool = True

    @property
    def initialized(self) -> bool:
        """True when a process group exists (launched by torchrun)."""
        return tdist.is_available() and tdist.is_initialized()


def _multi(dist) -> bool:
    """More than one rank and a process group. Only reads world_size, so any object with DistInfo's
    fields (rank, world_size, local_rank, device, is_main) works as `dist` everywhere in this module."""
    return dist.world_size > 1 and tdist.is_available() and tdist.is_initialized()


def init_distributed(device: str | None = None) -> DistInfo:
    """Set up torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Backend: nccl on CUDA (the CUDA device is set from LOCAL_RANK), gloo on CPU. `device` ("cuda" or
    "cpu") overrides the default choice, which is CUDA when available. Without torchrun (no WORLD_SIZE in
    the environment) no process group is created and a world of one is returned.
    """
    dev_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda", torch.cuda.current_device()) if dev_type == "cuda"
                        else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dev_type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        # device_id binds the NCCL communicator to this GPU up front (and silences a warning).
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        tdist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, is_main=rank == 0)


def barrier(dist: DistInfo) -> None:
    """Wait for every rank (no-op in a world of one)."""
    if _multi(dist):
        if dist.device.type == "cuda":
            tdist.barrier(device_ids=[dist.device.index])
        else:
            tdist.barrier()


def cleanup(dist: DistInfo) -> None:
    """Wait for every rank, then destroy the process group, if one was created.

    Drop the parallelized model and its optimizer first: FSDP state keeps the group alive, and a group
    that outlives the interpreter can abort the process at exit (a gloo worker thread still releasing
    finished work needs the GIL then: "terminate called without an active exception")."""
    if tdist.is_available() and tdist.is_initialized():
        gc.collect()  # dropped FSDP modules sit in reference cycles
        barrier(dist)
        tdist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The mean of `tensor` over all ranks (a new tensor; the input is left unchanged)."""
    out = tensor.detach().clone()
    if _multi(dist):
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        out /= dist.world_size
    return out


# ---------------------------------------------------------------------------------------- parallelize
def _checkpoint_no_early_stop(fn, *args, **kwargs):
    """Non-reentrant activation checkpoint that recomputes the whole layer. Early stopping would end
    the recompute once the saved tensors are rebuilt; with expert parallelism the set of saved tensors
    can differ between ranks (a rank that received no tokens), so ranks could stop on different sides of
    an all-to-all and deadlock."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def parallelize(model, dist: DistInfo, *, fsdp: bool = True, expert_parallel: int = 1,
                activation_checkpointing: bool = False, compile: bool = False,
                param_dtype: torch.dtype | None = None):
    """Apply activation checkpointing, compile, expert parallelism and FSDP2 to `model` in place.

    The model must be on `dist.device` and hold the same weights on every rank (same seed, or loaded
    from the same checkpoint). Build the optimizer AFTER this call: FSDP replaces the parameters by
    sharded DTensors. `expert_parallel` must divide both world_size and num_experts; 1 disables it.
    `param_dtype` (e.g. torch.bfloat16) makes FSDP gather and compute in that dtype while keeping fp32
    master weights and fp32 gradient reduction. In a world of one, FSDP and EP are skipped.
    Returns the model.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    world, ep = dist.world_size, int(expert_parallel)
    if ep < 1 or world % ep:
        raise ValueError(f"expert_parallel={ep} must be >= 1 and divide world_size={world}")
    num_experts = model.config.num_experts
    if ep > 1 and num_experts % ep:
        raise ValueError(f"expert_parallel={ep} must divide num_experts={num_experts}")
    if world > 1 and not fsdp:
        # Without FSDP nothing would average gradients over ranks; refuse rather than diverge silently.
        raise ValueError("world_size > 1 needs fsdp=True (FSDP2 does the data-parallel gradient reduction)")
    if world > 1 and not _multi(dist):
        raise RuntimeError("world_size > 1 but no process group: call init_distributed() under torchrun")

    layers = model.model.layers
    if activation_checkpointing:
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i], checkpoint_fn=_checkpoint_no_early_stop)
    if compile:
        ops.load_kernels()  # imported before tracing, not inside a compiled layer
        for layer in layers:
            layer.compile()  # in place: parameter names do not change
    if world == 1:
        return model

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dev_type = dist.device.type
    world_mesh = init_device_mesh(dev_type, (world,), mesh_dim_names=("world",))
    dp_mesh = None
    if ep > 1 and num_experts:
        mesh = init_device_mesh(dev_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        apply_expert_parallel(model, mesh["ep"].get_group(), mesh["ep"].get_local_rank(), ep)
        dp_mesh = mesh["dp"]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in layers:
        if dp_mesh is not None:
            for m in layer.modules():
                if isinstance(m, ExpertParallelExperts):
                    fully_shard(m, mesh=dp_mesh, mp_policy=mp)
        fully_shard(layer, mesh=world_mesh, mp_policy=mp)
    fully_shard(model, mesh=world_mesh, mp_policy=mp)
    return model


def clip_grad_norm_(model, max_norm: float, dist: DistInfo) -> torch.Tensor:
    """Clip the global L2 norm of all gradients to `max_norm`; returns the norm before clipping.

    Works for any mix of plain tensors, FSDP shards over the world and expert shards over "dp" x "ep"
    (torch.nn.utils.clip_grad_norm_ refuses DTensors on different meshes). Each rank sums the squares of
    the gradient elements it holds; every element lives on exactly one rank, so one all-reduce over the
    world gives the global sum.
    """
    # the local shard of every gradient (FSDP shards hide their padding, so nothing is counted twice)
    local = [g.to_local() if isinstance(g, DTensor) else g
             for g in (p.grad for p in model.parameters()) if g is not None]
    sq = torch.zeros((), device=dist.device, dtype=torch.float32)
    if local:
        sq = torch.stack([n.float() for n in torch._foreach_norm(local, 2.0)]).pow(2).sum().to(dist.device)
    if _multi(dist):
        tdist.all_reduce(sq, op=tdist.ReduceOp.SUM)
    norm = sq.sqrt()
    if local and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].device))
    return norm


# ---------------------------------------------------------------------------------------- state dicts
def _clean(fqn: str) -> str:
    """Parameter name as in the plain single-device model (drop wrapper prefixes)."""
    return fqn.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _gather_experts(model, dist: DistInfo, optimizer=None) -> tuple[dict, dict]:
    """Full (X, ...) expert tensors of every EP layer on the main rank: model tensors {fqn: tensor} and
    optimizer state {fqn: {state name: tensor}}. Collective: every rank must call it."""
    params, states = {}, {}
    for name, m in ep_modules(model).items():
        for pname in ("gate_up_proj", "down_proj"):
            p = getattr(m, pname)
            fqn = _clean(f"{name}.{pname}")
            full = _gather_ep_tensor(p, m, dist)
            if full is not None:
                params[fqn] = full
            if optimizer is not None and p in optimizer.state:
                for key, val in sorted(optimizer.state[p].items()):
                    # Per-element state (exp_avg, ...) has the parameter's shape; scalars (step) are shared.
                    if isinstance(val, torch.Tensor) and val.dim() > 0:
                        full = _gather_ep_tensor(val, m, dist)
                        if full is not None:
                            states.setdefault(fqn, {})[key] = full
    return params, states


def _gather_ep_tensor(t: torch.Tensor, m: ExpertParallelExperts, dist: DistInfo):
    """All-gather `t` over its dp shards, then over the EP group; the result on the main rank (CPU)."""
    local = (t.full_tensor() if isinstance(t, DTensor) else t).detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(m.ep_size)]
    tdist.all_gather(parts, local, group=m.group)
    return torch.cat(parts).cpu() if dist.is_main else None


def _ep_slice(name: str, model_eps: dict) -> tuple[int, int] | None:
    """Row range [lo, hi) of this rank's experts for the full-layout key `name`, or None."""
    mod, _, pname = name.rpartition(".")
    m = model_eps.get(mod)
    if m is None or pname not in ("gate_up_proj", "down_proj"):
        return None
    return m.ep_rank * m.num_local, (m.ep_rank + 1) * m.num_local


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state_dict(model, dist: DistInfo) -> dict[str, torch.Tensor]:
    """The plain single-device state dict (CPU tensors, full experts) on the main rank; {} elsewhere.
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_state_options(cpu_offload=True))
    experts, _ = _gather_experts(model, dist)
    if not dist.is_main:
        return {}
    out = {_clean(k): v for k, v in sd.items()}
    out.update(experts)
    return out


def _flatten_optimizer(osd: dict, expert_states: dict) -> tuple[dict, dict]:
    """Split an FQN-keyed optimizer state dict into safetensors tensors and JSON metadata."""
    tensors, scalars = {}, {}
    for fqn, state in osd["state"].items():
        fqn = _clean(fqn)
        for key, val in state.items():
            val = expert_states.get(fqn, {}).get(key, val)
            if isinstance(val, torch.Tensor):
                tensors[f"{fqn}/{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(fqn, {})[key] = val
    groups = [{k: ([_clean(p) for p in v] if k == "params" else v) for k, v in g.items()}
              for g in osd["param_groups"]]
    return tensors, {"format": _FORMAT, "param_groups": groups, "scalars": scalars}


def _unshare(sd: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings); give each key its own copy."""
    seen, out = set(), {}
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save_distributed_state(model, optimizer, path, dist: DistInfo) -> None:
    """Write the full model (and optimizer, unless None) state into directory `path` from the main rank:
    model.safetensors, optimizer.safetensors and optimizer.json. Keys are the single-device parameter
    names, experts in the full (X, ...) layout. Collective: every rank must call it; returns after
    the files are written."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_sd = full_model_state_dict(model, dist)
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
        _, expert_states = _gather_experts(model, dist, optimizer)
    if dist.is_main:
        os.makedirs(path, exist_ok=True)
        save_file(_unshare(model_sd), os.path.join(path, MODEL_FILE), metadata={"format": _FORMAT})
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(osd, expert_states)
            save_file(_unshare(tensors), os.path.join(path, OPTIM_FILE), metadata={"format": _FORMAT})
            with open(os.path.join(path, OPTIM_META), "w") as f:
                json.dump(meta, f, indent=1)
    barrier(dist)


def load_distributed_state(model, optimizer, path, dist: DistInfo) -> None:
    """Load a directory written by `save_distributed_state` (at any world size / EP degree) into a model
    already passed through `parallelize` (or a plain model) and its optimizer (or None). Every rank
    reads the files and keeps its own shards. Collective."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    eps = {_clean(n): m for n, m in ep_modules(model).items()}

    def local(name, t):
        rows = _ep_slice(name, eps)
        return t if rows is None else t[rows[0]:rows[1]].contiguous()

    model_sd = {k: local(k, v) for k, v in load_file(os.path.join(path, MODEL_FILE)).items()}
    set_model_state_dict(model, model_sd, options=_state_options())
    if optimizer is None:
        return
    with open(os.path.join(path, OPTIM_META)) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an openjamba distributed optimizer state (format {meta.get('format')!r})")
    state: dict[str, dict] = {fqn: dict(vals) for fqn, vals in meta["scalars"].items()}
    for key, t in load_file(os.path.join(path, OPTIM_FILE)).items():
        fqn, _, name = key.rpartition("/")
        state.setdefault(fqn, {})[name] = local(fqn, t) if t.dim() > 0 else t
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=_state_options())


__all__ = ["DistInfo", "init_distributed", "parallelize", "all_reduce_mean", "barrier", "cleanup",
           "clip_grad_norm_", "save_distributed_state", "load_distributed_state", "full_model_state_dict"]
