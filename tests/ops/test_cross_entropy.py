"""Triton fused cross-entropy (loss and gradient wrt the logits) vs the reference, and the input checks."""

import pytest
import torch
import torch.nn.functional as F

import openjamba.ops as ops
from kernel_testing import TOL, rel_err
from openjamba.ops.cross_entropy import triton as ce_triton
from openjamba.ops.cross_entropy.reference import cross_entropy_ref
from openjamba.ops.cross_entropy.triton import cross_entropy_triton


@pytest.fixture
def block_v():
    """Set the kernels' vocabulary tile for one test (restored afterwards)."""
    def set_block(bv):
        ce_triton.BLOCK_V_OVERRIDE = bv

    yield set_block
    ce_triton.BLOCK_V_OVERRIDE = None


def ce_check(logits, targets, ignore_index=-100, view=None, loss_tol=1e-5):
    """Loss and d loss / d logits of the kernel against the reference on a copy of the same logits; `view`
    maps the leaf to the tensor both functions see (a strided view)."""
    x = logits.detach().clone().requires_grad_()
    xr = logits.detach().clone().requires_grad_()
    view = view or (lambda t: t)
    loss = cross_entropy_triton(view(x), targets, ignore_index)
    ref = cross_entropy_ref(view(xr), targets, ignore_index)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= loss_tol * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    g = torch.tensor(1.7, device=x.device)  # a non-unit incoming gradient
    (loss * g).backward()
    (ref * g).backward()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert rel_err(x.grad, xr.grad) < TOL[logits.dtype]
    assert (view(x.grad)[targets == ignore_index] == 0).all()
    return loss, view(x.grad)


def make(T, V, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, V, generator=g) * scale).to(dtype).to(device)
    targets = torch.randint(0, V, (T,), generator=g).to(device)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,bv", [(1, None), (37, 16), (1000, 128), (5000, 512), (300, None)])
def test_cross_entropy(V, bv, dtype, device, block_v):
    """Several tiles per row with a masked tail (V not a multiple of the tile), one-tile rows and V = 1."""
    block_v(bv)
    logits, targets = make(7, V, dtype, device)
    ce_check(logits, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignore_index(dtype, device, block_v):
    block_v(64)
    logits, targets = make(9, 200, dtype, device)
    targets[[0, 3, 4, 8]] = -100
    loss, _ = ce_check(logits, targets)
    # the mean is over the 5 counted rows only
    kept = targets != -100
    assert torch.allclose(loss, F.cross_entropy(logits[kept].float(), targets[kept]), rtol=1e-5)
    # another ignore_index, one that is also a valid class
    targets = torch.where(kept, targets, torch.zeros_like(targets))
    ce_check(logits, targets, ignore_index=0)


def test_all_rows_ignored(device):
    logits, _ = make(4, 50, torch.float32, device)
    targets = torch.full((4,), -100, dtype=torch.long, device=device)
    x = logits.clone().requires_grad_()
    loss = cross_entropy_triton(x, targets)
    assert torch.isnan(loss) and torch.isnan(cross_entropy_ref(logits, targets))  # 0 / 0, as in PyTorch
    xr = logits.clone().requires_grad_()
    loss.backward()
    cross_entropy_ref(xr, targets).backward()
    assert (x.grad == 0).all() and (xr.grad == 0).all()  # ignored rows: no gradient, even with a 1 / 0 scale


def test_large_logits(device, block_v):
    """Logits of magnitude 1e4: the running max must rescale the partial sums (exp overflows otherwise)."""
    block_v(32)
    logits, targets = make(6, 300, torch.float32, device, scale=1e4)
    # rows whose maximum sits in the last tile, and one rising across every tile
    logits[1, -5] = 3e4
    logits[2] = torch.linspace(-1e4, 1e4, 300, device=device)
    targets[2] = 299
    logits[3, :40] = float("-inf")  # a first tile that is all -inf (a masked slice of the vocabulary)
    targets[3] = 100
    ce_check(logits, targets)


def test_non_contiguous_logits(device, block_v):
    """A column slice (row stride > V, passed as it is) and a transposed tensor (copied to a contiguous
    last dim)."""
    block_v(64)
    big, targets = make(5, 301, torch.bfloat16, device)
    assert not big[:, 1:].is_contiguous() and big[:, 1:].stride(-1) == 1
    ce_check(big, targets.clamp_max(299), view=lambda t: t[:, 1:])
    base, _ = make(120, 5, torch.float32, device, seed=1)
    ce_check(base, targets.clamp_max(119), view=lambda t: t.t())


def test_int32_targets_and_empty(device):
    logits, targets = make(5, 40, torch.float32, device)
    ce_check(logits, targets.int())
    empty = torch.empty(0, 40, device=device)
    assert torch.isnan(cross_entropy_triton(empty, torch.empty(0, dtype=torch.long, device=device)))


def test_bad_inputs(device):
    logits, targets = make(4, 10, torch.float32, device)
    for fn in (cross_entropy_triton, cross_entropy_ref):
        with pytest.raises(ValueError, match="2-D"):
            fn(logits[None], targets)
        with pytest.raises(ValueError, match="1-D"):
            fn(logits, targets[:, None])
        with pytest.raises(ValueError, match="4 rows"):
            fn(logits, targets[:3])
        with pytest.raises(TypeError, match="integer"):
            fn(logits, targets.float())
        with pytest.raises(TypeError, match="float"):
            fn(logits.long(), targets)
        if device == "cpu":  # on CUDA the range check would need a host sync
            for bad in (10, -1):
                t = targets.clone()
                t[2] = bad
                with pytest.raises(ValueError, match="out of range"):
                    fn(logits, t)


def test_dispatch(device):
    """ops.cross_entropy picks the kernel for the triton backend and the reference for the reference one."""
    old = ops.get_backend()
    logits, targets = make(6, 100, torch.bfloat16, device)
    try:
        ops.set_backend("triton")
        assert ops.resolve("cross_entropy", on_cuda=True) == (cross_entropy_triton, "triton")
        loss = ops.cross_entropy(logits, targets)
        ops.set_backend("reference")
        ref = ops.cross_entropy(logits, targets)
        assert torch.equal(ref, F.cross_entropy(logits.float(), targets))
        assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    finally:
        ops.set_backend(old)


@pytest.mark.gpu
def test_cross_entropy_gpu_real_size():
    """The jamba-1b vocabulary at a real token count, bf16, without a host sync."""
    logits, targets = make(4096, 32768, torch.bfloat16, "cuda", scale=2.0)
    targets[::7] = -100
    x = logits.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = cross_entropy_triton(x, targets)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ce_check(logits, targets)
    ce_check(logits.float(), targets)
