"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

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


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused (one kernel for all parameters) on CUDA unless disabled."""
    fused = {"auto": device.type == "cuda", "true": True, "false": False}[cfg.fused]
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    # The names are kept for reports only: the optimizer state is keyed by position.
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


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
