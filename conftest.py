"""Test-session setup shared by every test folder.

Triton kernels run on the CPU under the Triton interpreter when no GPU is present; the variable must
be set before Triton is first imported.
"""

import os

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
