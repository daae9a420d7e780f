"""One-token selective state update (decoding), pure PyTorch: the specification.

    state: (B, D, N) fp32, updated in place      u, delta, z: (B, D)      B, C: (B, N)
Returns y: (B, D) in u's dtype. Same maths as one step of `selective_scan_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_ref(state, u, delta, A, B, C, D_skip=None, z=None, delta_bias=None,
                               delta_softplus=True):
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(delta[:, :, None] * A.float())
    dBu = delta[:, :, None] * B.float()[:, None, :] * u[:, :, None]
    state.copy_(dA * state + dBu)
    y = torch.einsum("bdn,bn->bd", state, C.float())
    if D_skip is not None:
        y = y + u * D_skip.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)

