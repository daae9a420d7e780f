"""One-token selective state update (decoding), pure PyTorch: the specification.

    state: (B, D, N) fp32, updated in place      u, delta, z: (B, D)      B, C: (B, N)
Returns y: (B, D) in u's dtype. Same maths as one step of `selective_scan_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t):
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so tests can compare tightly)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def selective_state_update_ref(state, u, delta, A, B, C, D_skip=None, z=None, delta_bias=None,
                               delta_softplus=True):
    dtype = u.dtype
    acc = _acc(u)
    u, delta = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(delta[:, :, None] * A.to(acc))
    dBu = delta[:, :, None] * B.to(acc)[:, None, :] * u[:, :, None]
    state.copy_(dA * state + dBu)
    y = torch.einsum("bdn,bn->bd", state, C.to(acc))
    if D_skip is not None:
        y = y + u * D_skip.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(dtype)

