"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule.

Which AdamW runs is chosen by `optim.fused` and named in the model line the trainer prints:
    "triton"  ClippedAdamW: one Triton launch per parameter group that also applies the gradient-norm
              clipping (the gradients are read once and never rewritten); CUDA, one process
    "true"    torch.optim.AdamW(fused=True) after torch's clip_grad_norm_; CUDA
    "false"   torch.optim.AdamW (for-each implementation) after clip_grad_norm_; any device
    "auto"    "triton" on CUDA in one process when the ops dispatch runs its Triton kernel there (Triton
              importable, ops backend not "reference"), else "true" on CUDA, else "false"
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops

# Parameters that are not weight matrices in the usual sense: decaying them towards 0 is harmful
# (A_log = log of the SSM decay rates, D = the skip connection, norm gains) or pointless (biases).
_NO_DECAY_NAMES = ("A_log", "D")


def _is_embedding(name: str) -> bool:
    return "embed_tokens" in name or name.endswith("lm_head.weight")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: weight matrices (decayed) and everything else (norm gains, biases, A_log, D,
    and the embeddings unless `decay_embeddings`). Each group records its parameter names."""
    decay, no_decay = ([], []), ([], [])
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        skip = (p.ndim < 2 or leaf in _NO_DECAY_NAMES or "norm" in name
                or (_is_embedding(name) and not decay_embeddings))
        target = no_decay if skip else decay
        target[0].append(p)
        target[1].append(name)
    return [
        {"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]


class ClippedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose update also applies the gradient-norm clipping, through `ops.adamw_step`
    (on CUDA one Triton launch per parameter group and dtype; see ops/adamw).

    Before each `step()` call `clip_with(grad_norm, max_norm)` with the total gradient norm as a device
    tensor: the update scales the gradients by min(1, max_norm / (grad_norm + 1e-6)) as it reads them,
    which is what torch's clip_grad_norm_ does in a separate pass. A `found_inf` attribute (a one-element
    float device tensor, as torch's fused AdamW takes it) skips the whole update on the device when non-zero.
    The state (step, exp_avg, exp_avg_sq per parameter) has torch's layout, so checkpoints move freely
    between this and torch.optim.AdamW; steps live on the parameters' device as float32.

    After `keep_lr_on_device()` the kernels read each group's learning rate from a device tensor that
    `stage_lr()` fills from the groups' "lr" without a host wait: a CUDA graph that captured `step()`
    then follows the schedule (the trainer's train.cuda_graph captures the update so).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.grad_norm: torch.Tensor | None = None
        self.max_norm = float("inf")
        self.found_inf: torch.Tensor | None = None
        self._tables: dict = {}  # per (group, dtype): the Triton kernel's device tables of tensor addresses
        self._lr_device: torch.Tensor | None = None  # one float32 per group, see keep_lr_on_device

    def keep_lr_on_device(self, device: torch.device) -> None:
        """From now on the update reads the learning rates from a device tensor; call `stage_lr()` after
        changing a group's "lr"."""
        self._lr_device = torch.zeros(len(self.param_groups), dtype=torch.float32, device=device)
        self.stage_lr()

    def stage_lr(self) -> None:
        """Copy the groups' learning rates to the device tensor, queued on the current stream (the update
        that follows reads them; the host does not wait)."""
        if self._lr_device is None:
            raise RuntimeError("ClippedAdamW.stage_lr: call keep_lr_on_device() first")
        lrs = torch.tensor([float(g["lr"]) for g in self.param_groups], dtype=torch.float32)
        if self._lr_device.is_cuda:
            lrs = lrs.pin_memory()  # a new pinned buffer per call: it is not rewritten while the copy waits
        self._lr_device.copy_(lrs, non_blocking=True)

    def clip_with(self, grad_norm: torch.Tensor | None, max_norm: float) -> None:
        """Clip the next step's gradients to total norm max_norm (<= 0: no clipping)."""
        self.grad_norm = grad_norm if max_norm > 0 else None
        self.max_norm = max_norm if max_norm > 0 else float("inf")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ClippedAdamW.step takes no closure")
        for gi, group in enumerate(self.param_groups):
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("ClippedAdamW runs plain AdamW: amsgrad and maximize are not supported")
            by_dtype: dict[torch.dtype, list[list[torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                elif state["step"].device != p.device or state["step"].dtype != torch.float32:
                    state["step"] = state["step"].to(p.device, torch.float32)  # e.g. loaded from a CPU step
                lists = by_dtype.setdefault(p.dtype, [[], [], [], [], []])
                for row, t in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    row.append(t)
            beta1, beta2 = group["betas"]
            lr = group["lr"] if self._lr_device is None else self._lr_device[gi]
            for dtype, (params, grads, exp_avgs, exp_avg_sqs, steps) in by_dtype.items():
                ops.adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, group["weight_decay"],
                               beta1, beta2, group["eps"], grad_norm=self.grad_norm, max_norm=self.max_norm,
                               found_inf=self.found_inf, cache=self._tables.setdefault((gi, dtype), {}))
        self.grad_norm = None  # each step is given its own norm
        return None


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """Which AdamW: "triton" (ClippedAdamW), "fused" (torch's fused AdamW) or "foreach" (torch's default)."""
    if isinstance(optimizer, ClippedAdamW):
        return "triton"
    return "fused" if optimizer.defaults.get("fused") else "foreach"


def guards_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer can skip an update on the device (a `found_inf` tensor) without the host."""
    return optimizer_kind(optimizer) in ("triton", "fused")


def build_optimizer(model: nn.Module, cfg, device: torch.device, world_size: int = 1) -> torch.optim.AdamW:
    """AdamW over `param_groups`, the implementation chosen by cfg.fused (see the module docstring)."""
    choice = cfg.fused
    if choice == "auto":  # the ops dispatch decides (and logs) whether the Triton kernel runs on CUDA here
        on_gpu = device.type == "cuda"
        triton_ok = on_gpu and world_size == 1 and ops.resolve("adamw", on_cuda=True)[1] == "triton"
        choice = "triton" if triton_ok else "true" if on_gpu else "false"
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    # The names are kept for reports only: the optimizer state is keyed by position.
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    if choice == "triton":
        if world_size > 1:
            raise ValueError(f"optim.fused \"triton\" folds the clipping into a one-process update; with "
                             f"{world_size} processes use \"true\" or \"auto\"")
        reason = ops._triton_usable()
        if reason:
            raise ops.BackendUnavailable(f"optim.fused \"triton\" cannot run here: {reason}")
        if device.type != "cuda" and not ops._interpreting():
            raise ops.BackendUnavailable("optim.fused \"triton\" needs a CUDA device")
        return ClippedAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=choice == "true")


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    `warmup_steps`, then a cosine from lr down to lr * min_lr_ratio at `max_steps`, flat after."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
