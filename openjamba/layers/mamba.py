"""Jamba's Mamba mixer: Mamba-1 selective SSM with RMSNorms on dt, B and C (see jamba-spec)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .norm import RMSNorm


class MambaMixer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        H, Di = config.hidden_size, config.mamba_inner_size
        self.d_inner, self.d_state, self.dt_rank = Di, config.mamba_d_state, config.mamba_dt_rank
        self.d_conv = config.mamba_d_conv
        self.in_proj = nn.Linear(H, 2 * Di, bias=config.mamba_proj_bias)
        # nn.Conv1d only for the checkpoint layout (Di, 1, K); the ops take weight (Di, K).
        self.conv1d = nn.Conv1d(Di, Di, self.d_conv, groups=Di, bias=config.mamba_conv_bias,
                                padding=self.d_conv - 1)
        self.x_proj = nn.Linear(Di, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, Di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(Di, 1))
        self.D = nn.Parameter(torch.ones(Di))
        self.out_proj = nn.Linear(Di, H, bias=config.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, eps=config.rms_norm_eps)
        self.b_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)
        self.c_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """Mamba's init: A = -(1..N), D = 1, dt bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32,
                                                device=self.A_log.device)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.d_inner, device=self.D.device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x, mask=None, cache=None):
        """x: (B, T, H); mask: (B, T) bool (False = padding) or None. Returns (B, T, H)."""
        B, T, _ = x.shape
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, Di) each
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)  # with in_proj bias, padding must not reach the conv state
        weight = self.conv1d.weight.squeeze(1)  # (Di, K)
        bias = self.conv1d.bias
        if cache is not None and T == 1:
            u = ops.causal_conv1d_update(u[:, 0], cache.conv[self.layer_idx], weight, bias)[:, None]
        else:
            state = cache.conv[self.layer_idx] if cache is not None else None
            u, final_conv = ops.causal_conv1d(u, weight, bias, "silu", state)
            if cache is not None:
                cache.conv[self.layer_idx].copy_(final_conv)
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(self.dt_layernorm(dt), self.dt_proj.weight)  # bias added in fp32 by the scan
        Bm, Cm = self.b_layernorm(Bm), self.c_layernorm(Cm)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        if cache is not None and T == 1:
            y = ops.selective_state_update(cache.ssm[self.layer_idx], u[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0],
                                           self.D, z[:, 0], self.dt_proj.bias, True)[:, None]
        else:
            state = cache.ssm[self.layer_idx] if cache is not None else None
            y, final = ops.selective_scan(u, dt, A, Bm, Cm, self.D, z, self.dt_proj.bias, True, state)
            if cache is not None:
                cache.ssm[self.layer_idx].copy_(final)
        return self.out_proj(y.to(x.dtype))
