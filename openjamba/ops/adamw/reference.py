"""AdamW update over a list of tensors with gradient-norm clipping folded in: the specification.

    adamw_step_ref(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decay, beta1, beta2, eps,
                   grad_norm=None, max_norm=inf, found_inf=None)

For each tensor, in fp32 and written back in the tensor's own dtype (the arithmetic of torch's fused
AdamW, `torch.optim.AdamW(fused=True)`):

    c   = min(1, max_norm / (grad_norm + 1e-6))       (1 without grad_norm; as clip_grad_norm_ scales)
    g   = c * grad
    p   = p * (1 - lr * weight_decay)
    m   = beta1 * m + (1 - beta1) * g
    v   = beta2 * v + (1 - beta2) * g^2
    p   = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),   t = step + 1

and step += 1. With found_inf (a one-element float tensor) non-zero nothing changes: no parameter,
moment or step. The gradients are only read: the clipping never writes them, which is the point of
folding it into the update (torch's clip_grad_norm_ rewrites every gradient before the optimizer reads
it again). Steps are float32 one-element tensors, as torch's fused AdamW keeps them. lr is a float or a
one-element tensor.
"""

from __future__ import annotations

import torch


def clip_coefficient(grad_norm: torch.Tensor | None, max_norm: float) -> torch.Tensor | float:
    if grad_norm is None:
        return 1.0
    return (max_norm / (grad_norm.float() + 1e-6)).clamp(max=1.0)


def adamw_step_ref(params, grads, exp_avgs, exp_avg_sqs, steps, lr: float, weight_decay: float,
                   beta1: float, beta2: float, eps: float, grad_norm=None, max_norm: float = float("inf"),
                   found_inf=None) -> None:
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    coef = clip_coefficient(grad_norm, max_norm)
    lr = float(lr)
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t = float(s.item()) + 1
        g32 = g.float() * coef
        p32 = p.float() * (1 - lr * weight_decay)
        m32 = beta1 * m.float() + (1 - beta1) * g32
        v32 = beta2 * v.float() + (1 - beta2) * g32 * g32
        denom = v32.sqrt() / (1 - beta2 ** t) ** 0.5 + eps
        p32 = p32 - (lr / (1 - beta1 ** t)) * m32 / denom
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)
        s.add_(1)
