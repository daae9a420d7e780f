"""AdamW with folded clipping: the Triton kernel against the reference (parameters, both moments, steps),
the reference against torch's AdamW after clip_grad_norm_, the found_inf guard, and ClippedAdamW
continuing from a torch.optim.AdamW state."""

import pytest
import torch

from openjamba.ops.adamw.reference import adamw_step_ref
from openjamba.train.optim import ClippedAdamW

SHAPES = [(3, 5), (40000,), (7,), (2, 16384)]  # one tensor spans three chunks, one ends a chunk exactly
HP = dict(lr=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)


def make_state(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device, dtype) for s in SHAPES]
    moments = [(torch.randn(s, generator=g) * 0.1).to(device, dtype) for s in SHAPES]
    sqs = [(torch.rand(s, generator=g) * 0.01).to(device, dtype) for s in SHAPES]
    steps = [torch.full((), 4.0, device=device) for _ in SHAPES]
    return params, moments, sqs, steps


def grads_of(dtype, device, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(device, dtype) for s in SHAPES]


def clone(state):
    return [[t.clone() for t in row] for row in state]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [True, False])
def test_triton_matches_reference(dtype, clip, device, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1") if device == "cpu" else None
    from openjamba.ops.adamw.triton import adamw_step_triton

    ref = make_state(dtype, device)
    tri = clone(ref)
    cache = {}
    n_steps = 3 if dtype == torch.float32 else 1  # bf16: one rounding apart, not compounded over steps
    for step in range(n_steps):
        grads = grads_of(dtype, device, step)
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if clip else None
        adamw_step_ref(ref[0], grads, ref[1], ref[2], ref[3], **HP, grad_norm=norm, max_norm=1.0)
        adamw_step_triton(tri[0], [g.clone() for g in grads], tri[1], tri[2], tri[3], **HP, grad_norm=norm,
                          max_norm=1.0, cache=cache)
        assert [t.item() for t in tri[3]] == [5.0 + step] * len(SHAPES)
    for row_r, row_t in zip(ref, tri):
        for r, t in zip(row_r, row_t):
            assert t.dtype == r.dtype
            if dtype == torch.float32:
                torch.testing.assert_close(t, r, rtol=1e-6, atol=1e-7)
            else:  # the same fp32 arithmetic, rounded once to bf16 (truncated under the CPU interpreter,
                # to nearest on GPUs): one bf16 ulp apart (ulp(x) <= 2^-7 |x|), plus fp32 rounding where
                # the moment update cancels (FMA on the GPU, separate kernels in the reference)
                assert ((t.float() - r.float()).abs() <= 2 ** -7 * r.float().abs() + 1e-6).all()


def test_reference_matches_torch_adamw_after_clipping():
    """fp32: the reference with the clipping folded in against clip_grad_norm_ + torch.optim.AdamW."""
    torch.manual_seed(0)
    ours = [torch.randn(s) for s in SHAPES]
    theirs = [p.clone().requires_grad_() for p in ours]
    opt = torch.optim.AdamW(theirs, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"])
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    steps = [torch.zeros(()) for _ in ours]
    for step in range(4):
        grads = [g * 3 for g in grads_of(torch.float32, "cpu", step)]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        opt.step()
        adamw_step_ref(ours, grads, m, v, steps, **HP, grad_norm=norm, max_norm=0.5)
    assert norm > 1.0  # clipping was active in every step
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for p, mine_m, mine_v, s in zip(theirs, m, v, steps):
        torch.testing.assert_close(opt.state[p]["exp_avg"], mine_m)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], mine_v)
        assert s.item() == 4.0


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_found_inf_skips_everything(impl, device, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1") if device == "cpu" else None
    from openjamba.ops.adamw.triton import adamw_step_triton

    fn = adamw_step_ref if impl == "reference" else adamw_step_triton
    state = make_state(torch.float32, device)
    before = clone(state)
    grads = grads_of(torch.float32, device, 0)
    fn(state[0], grads, state[1], state[2], state[3], **HP, found_inf=torch.ones((), device=device))
    for row_b, row_a in zip(before, state):
        for b, a in zip(row_b, row_a):
            assert torch.equal(a, b)
    fn(state[0], grads, state[1], state[2], state[3], **HP, found_inf=torch.zeros((), device=device))
    assert all(s.item() == 5.0 for s in state[3]) and not torch.equal(state[0][0], before[0][0])


def test_clipped_adamw_continues_a_torch_adamw_state():
    """Two steps of torch.optim.AdamW, its state_dict loaded into ClippedAdamW: the next two steps match
    torch continuing (fp32, clipping through clip_with against clip_grad_norm_)."""
    torch.manual_seed(1)
    init = [torch.randn(s) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ta, tb = torch.optim.AdamW(groups(a), **kw), torch.optim.AdamW(groups(b), **kw)
    for step in range(2):
        for ps, opt in ((a, ta), (b, tb)):
            for p, g in zip(ps, grads_of(torch.float32, "cpu", step)):
                p.grad = g.clone()
            opt.step()
    ours = ClippedAdamW(groups(b), **kw)
    ours.load_state_dict(tb.state_dict())
    for step in range(2, 4):
        grads = grads_of(torch.float32, "cpu", step)
        for p, g in zip(a, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(a, 0.3)
        ta.step()
        for p, g in zip(b, grads):
            p.grad = g.clone()
        ours.clip_with(torch.nn.utils.get_total_norm([p.grad for p in b]), 0.3)
        ours.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert all(ours.state[p]["step"].item() == 4.0 for p in b)
    back = torch.optim.AdamW(groups([p.detach().clone().requires_grad_() for p in b]), **kw)
    back.load_state_dict(ours.state_dict())  # and back into torch's optimizer
    for p, q in zip(b, back.param_groups[0]["params"] + back.param_groups[1]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(back.state[q][key].cpu(), ours.state[p][key].cpu())


def test_triton_tables_follow_the_tensors_and_refuse_unaligned_ones(device, monkeypatch):
    """One cache, two tensor lists of the same length and different sizes: each update is right (the
    address tables are rebuilt, never reused for other sizes); a view 2 bytes into its storage is refused."""
    monkeypatch.setenv("TRITON_INTERPRET", "1") if device == "cpu" else None
    from openjamba.ops.adamw.triton import adamw_step_triton

    cache = {}
    for shapes in ([(5,), (9000,)], [(9000,), (3,)]):
        g = torch.Generator().manual_seed(len(shapes[0]))
        ref = [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(3)]
        ref.append([torch.zeros((), device=device) for _ in shapes])
        tri = clone(ref)
        grads = [torch.randn(s, generator=g).to(device) for s in shapes]
        ref[2] = [v.abs() for v in ref[2]]
        tri[2] = [v.clone() for v in ref[2]]
        adamw_step_ref(ref[0], grads, ref[1], ref[2], ref[3], **HP)
        adamw_step_triton(tri[0], grads, tri[1], tri[2], tri[3], **HP, cache=cache)
        for r, t in zip(ref[0], tri[0]):
            torch.testing.assert_close(t, r, rtol=1e-6, atol=1e-7)
    base = torch.zeros(17, dtype=torch.bfloat16, device=device)
    p = base[1:]
    with pytest.raises(ValueError, match="16-byte boundary"):
        adamw_step_triton([p], [p.clone()], [p.clone()], [p.clone()], [torch.zeros((), device=device)], **HP)


def test_triton_reads_a_device_lr(device, monkeypatch):
    """lr given as a one-element device tensor: the same update as the float, and a wrong tensor is refused."""
    monkeypatch.setenv("TRITON_INTERPRET", "1") if device == "cpu" else None
    from openjamba.ops.adamw.triton import adamw_step_triton

    hp = {k: v for k, v in HP.items() if k != "lr"}
    as_float, as_tensor = make_state(torch.float32, device), make_state(torch.float32, device)
    grads = grads_of(torch.float32, device, 0)
    adamw_step_triton(as_float[0], grads, as_float[1], as_float[2], as_float[3], lr=HP["lr"], **hp)
    lr = torch.tensor([0.0, HP["lr"]], device=device)[1]  # a view at an offset, as ClippedAdamW passes it
    adamw_step_triton(as_tensor[0], grads, as_tensor[1], as_tensor[2], as_tensor[3], lr=lr, **hp)
    for row_f, row_t in zip(as_float, as_tensor):
        for f, t in zip(row_f, row_t):
            assert torch.equal(f, t)
    with pytest.raises(ValueError, match="tensor lr must be one float32"):
        adamw_step_triton(as_tensor[0], grads, as_tensor[1], as_tensor[2], as_tensor[3],
                          lr=torch.tensor(1e-3, dtype=torch.float64, device=device), **hp)


@pytest.mark.gpu
def test_clipped_adamw_step_never_waits_for_the_gpu():
    """An update with the clipping and the found_inf guard only queues work: under torch's sync debug mode
    any host wait (a tensor read as a Python number, a blocking copy) is an error. Covers the steady state
    and new gradients (tables rebuilt through pinned memory)."""
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ClippedAdamW([{"params": params}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    norm = torch.tensor(2.0, device="cuda")
    opt.found_inf = torch.zeros((), device="cuda")
    opt.clip_with(norm, 1.0)
    opt.step()  # creates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.clip_with(norm, 1.0)
            opt.step()
            for p in params:
                p.grad = torch.randn_like(p)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(opt.state[p]["step"].item() == 3.0 for p in params)
