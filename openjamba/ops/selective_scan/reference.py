"""Selective scan (Mamba-1), pure PyTorch: the specification and a fast chunked form.

Shapes (channel-last, as the model produces them; L = time, D = channels, N = state size):
    u, delta, z: (B, L, D)     A: (D, N) fp32, negative      B, C: (B, L, N)
    D_skip, delta_bias: (D,)   initial_state / final state: (B, D, N) fp32

    delta = softplus(delta + delta_bias)                   (when delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <h_t, C_t> + D_skip * u_t ;   y_t *= silu(z_t)  (when z is given)

Both functions compute in fp32 and return y in u's dtype and the final state in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t):
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so tests can compare tightly)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _prepare(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus):
    acc = _acc(u)
    u, delta, B, C = u.to(acc), delta.to(acc), B.to(acc), C.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A.to(acc), B, C


def _finish(y, u, D_skip, z, dtype):
    if D_skip is not None:
        y = y + u * D_skip.to(_acc(u))
    if z is not None:
        y = y * F.silu(z.to(_acc(u)))
    return y.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=True,
                       initial_state=None):
    """The specification: a sequential loop over time in fp32. Returns (y, final_state)."""
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus)
    batch, L, D = u.shape
    h = u.new_zeros(batch, D, A.shape[1]) if initial_state is None else initial_state.to(_acc(u))
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, t, :, None] * A)  # (B, D, N)
        dBu = delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]  # (B, D, N)
        h = dA * h + dBu
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, D)
    return _finish(y, u, D_skip, z, dtype), h


def _scan_chunk(dA, dBu, h0):
    """Inclusive scan of h_t = dA_t * h_{t-1} + dBu_t over dim 1 in log2(T) doubling steps.

    dA, dBu: (B, T, D, N). Only products of decays (<= 1) and sums appear, so it is as stable as
    the sequential loop for any delta and A (no exp of cumulative sums).
    """
    a, b = dA, dBu
    T = a.shape[1]
    step = 1
    while step < T:
        # element t combines with element t - step: (a_t, b_t) o (a_s, b_s) = (a_t a_s, a_t b_s + b_t)
        b = torch.cat([b[:, :step], torch.addcmul(b[:, step:], a[:, step:], b[:, :-step])], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    return b + a * h0[:, None]  # (B, T, D, N)


def selective_scan_chunked(u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, chunk_size: int = 64):
    """Same function as `selective_scan_ref`, parallel within chunks of `chunk_size` steps.

    A Python loop runs over chunks (L / chunk_size iterations), never over time steps; peak extra
    memory is O(B * chunk_size * D * N) per chunk in inference (autograd keeps what it needs).
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus)
    batch, L, D = u.shape
    h = u.new_zeros(batch, D, A.shape[1]) if initial_state is None else initial_state.to(_acc(u))
    ys = []
    for start in range(0, L, chunk_size):
        sl = slice(start, min(start + chunk_size, L))
        d = delta[:, sl, :, None]  # (B, T, D, 1)
        dA = torch.exp(d * A)  # (B, T, D, N)
        dBu = d * B[:, sl, None, :] * u[:, sl, :, None]
        hs = _scan_chunk(dA, dBu, h)  # (B, T, D, N)
        ys.append(torch.einsum("btdn,btn->btd", hs, C[:, sl]))
        h = hs[:, -1]
    y = torch.cat(ys, dim=1) if ys else u.new_zeros(batch, 0, D)
    return _finish(y, u, D_skip, z, dtype), h
