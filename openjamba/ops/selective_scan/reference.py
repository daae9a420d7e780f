"""Selective scan (Mamba-1), pure PyTorch: the specification and a fast chunked form.

Shapes (channel-last, as the model produces them; L = time, D = channels, N = state size):
    u, delta, z: (B, L, D)     A: (D, N) fp32, negative      B, C: (B, L, N)
    D_skip, delta_bias: (D,)   initial_state / final state: (B, D, N) fp32

    delta = softplus(delta + delta_bias)                   (when delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <h_t, C_t> + D_skip * u_t ;   y_t *= silu(z_t)  (when z is given)

Both functions compute in fp32 and return y in u's dtype and the final state in fp32, also inside an
autocast region (autocast would otherwise run the einsums in bf16/fp16).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F


def _no_autocast(t):
    """Turn autocast off for the scan on t's device (a no-op context where autocast does not exist)."""
    if torch.amp.is_autocast_available(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_off(fn):
    """Run a scan with autocast off on its input's device: the einsums stay in the compute dtype."""
    @functools.wraps(fn)
    def wrapper(u, *args, **kwargs):
        with _no_autocast(u):
            return fn(u, *args, **kwargs)
    return wrapper


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


@_autocast_off
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


class _ChunkedScan(torch.autograd.Function):
    """y_t = <h_t, C_t> over the recurrence, chunk by chunk, with a hand-written backward.

    Saves only the inputs and one state per chunk boundary; the backward recomputes each chunk's states
    and runs the adjoint recurrence g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1} backwards with the same
    doubling scan. Memory is O(B L D N / chunk) instead of autograd's O(B L D N log chunk).
    """

    @staticmethod
    def forward(ctx, delta, A, B, C, u, h0, chunk):
        batch, L, D = u.shape
        h, ys, bounds = h0, [], []
        for start in range(0, L, chunk):
            sl = slice(start, min(start + chunk, L))
            bounds.append(h)
            d = delta[:, sl, :, None]  # (B, T, D, 1)
            hs = _scan_chunk(torch.exp(d * A), d * B[:, sl, None, :] * u[:, sl, :, None], h)  # (B, T, D, N)
            ys.append(torch.einsum("btdn,btn->btd", hs, C[:, sl]))
            h = hs[:, -1]
        ctx.chunk = chunk
        ctx.save_for_backward(delta, A, B, C, u, *bounds)
        y = torch.cat(ys, dim=1) if ys else u.new_zeros(batch, 0, D)
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        delta, A, B, C, u, *bounds = ctx.saved_tensors
        chunk, L = ctx.chunk, u.shape[1]
        # The incoming gradients take the compute dtype (fp32/fp64): one in bf16, as an output used under
        # autocast produces, must not meet the fp32 states in the einsums below.
        gy = torch.zeros_like(u) if gy is None else gy.to(u.dtype)
        carry = torch.zeros_like(bounds[0]) if gh is None else gh.to(bounds[0].dtype)  # dLoss/dh at the chunk end
        g_delta, g_u = torch.empty_like(delta), torch.empty_like(u)
        g_B, g_C = torch.empty_like(B), torch.empty_like(C)
        g_A = torch.zeros_like(A)
        with _no_autocast(u):  # a backward called inside an autocast region still computes in fp32
            for c in reversed(range(len(bounds))):
                sl = slice(c * chunk, min((c + 1) * chunk, L))
                d, uu, Bc, Cc = delta[:, sl, :, None], u[:, sl, :, None], B[:, sl, None, :], C[:, sl, None, :]
                dA = torch.exp(d * A)  # (B, T, D, N)
                hs = _scan_chunk(dA, d * Bc * uu, bounds[c])
                h_prev = torch.cat([bounds[c][:, None], hs[:, :-1]], dim=1)
                # adjoint, scanned in reverse time: g_t = gy_t C_t + dA_{t+1} g_{t+1}, g_last = gy C + carry
                a_rev = torch.cat([dA[:, 1:], torch.ones_like(dA[:, :1])], dim=1).flip(1)
                g = _scan_chunk(a_rev, (gy[:, sl, :, None] * Cc).flip(1), carry).flip(1)  # (B, T, D, N)
                g_C[:, sl] = torch.einsum("btdn,btd->btn", hs, gy[:, sl])
                g_dA = g * h_prev * dA  # d/d(delta A) of exp(delta A)
                g_x = g  # x = delta B u
                g_delta[:, sl] = (g_dA * A).sum(-1) + (g_x * Bc * uu).sum(-1)
                g_A += torch.einsum("btdn,btd->dn", g_dA, delta[:, sl])
                g_B[:, sl] = torch.einsum("btdn,btd->btn", g_x, delta[:, sl] * u[:, sl])
                g_u[:, sl] = (g_x * Bc).sum(-1) * delta[:, sl]
                carry = g[:, 0] * dA[:, 0]
        return g_delta, g_A, g_B, g_C, g_u, carry, None


@_autocast_off
def selective_scan_chunked(u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, chunk_size: int = 16):
    """Same function as `selective_scan_ref`, parallel within chunks of `chunk_size` steps.

    A Python loop runs over chunks (L / chunk_size iterations), never over time steps. Extra memory is
    O(B * chunk_size * D * N) at a time, plus one (B, D, N) state per chunk saved for the backward.
    Small chunks are fastest on CPUs: the doubling scan does log2(chunk_size) passes.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus)
    batch, L, D = u.shape
    h = u.new_zeros(batch, D, A.shape[1]) if initial_state is None else initial_state.to(_acc(u))
    y, h = _ChunkedScan.apply(delta, A, B, C, u, h, chunk_size)
    return _finish(y, u, D_skip, z, dtype), h
