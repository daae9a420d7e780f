"""Can one persistent kernel stream a stack of layers faster than a chain of PDL-launched kernels? A test of the
design the batch-1 decode step would need, on the simplest piece: jamba-1b's dense MLP layers.

    python benchmarks/bench_persistent_mlp.py            # jamba-1b widths, bf16, batch 1

The persistent kernel runs --calls MLP layers (the model's dense layers in turn: h += down(silu(gate) * up)
of RMSNorm(h)) with one program per SM and two grid-wide barriers per layer (after gate/up, after the
residual add). Each program holds its share of a stage's weights in registers (bf16 pairs as int32 words,
so they stay packed) and loads the weights of the stage DEPTH stages ahead between its arrival at a barrier
and its wait there: with DEPTH 1 the next stage's weights stream during the wait (what PDL gives a kernel
chain); with DEPTH 2 the stage after that streams as well. Variants without the barriers (the weight
streams alone; results not checked) and on one layer repeated (its weights stay in L2) split the time.
Side by side, in one run: the fused decode step's own MLP kernels (ffn_up + down_residual, PDL) for the
same layers, each through a CUDA graph, microseconds per layer, against the weight bytes at 4.27 TB/s.
Writes benchmarks/results/persistent_mlp_<gpu>.json (or --out). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

BANDWIDTH = 4.27e12  # bytes/s: the H200's device-copy ceiling (shared/anchors.md)


@triton.jit
def _arrive(bar_ptr):
    """Every thread's stores of this program are done (CTA barrier), then one release add on the counter."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(bar_ptr, target):
    c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while c < target:
        c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _tile(w_ptr, K, r0, rend, BR: tl.constexpr, k0, BK: tl.constexpr):
    """W[r0:r0+BR, k0:k0+BK] of a row-major (., K) weight of int32 words (two bf16 each); rows >= rend and
    columns >= K are 0."""
    rs = r0 + tl.arange(0, BR)
    ks = k0 + tl.arange(0, BK)
    return tl.load(w_ptr + rs[:, None] * K + ks[None, :], mask=(rs[:, None] < rend) & (ks[None, :] < K), other=0,
                   eviction_policy="evict_first")


@triton.jit
def _up_tiles(wgu_ptr, layer, pid, F2, HW, RU: tl.constexpr, BU1: tl.constexpr, BU2: tl.constexpr,
              BHW: tl.constexpr):
    w = wgu_ptr + (layer + 0 * pid).to(tl.int64) * F2 * HW
    r0 = pid * RU
    rend = tl.minimum(r0 + RU, F2)
    return _tile(w, HW, r0, rend, BU1, 0, BHW), _tile(w, HW, r0 + BU1, rend, BU2, 0, BHW)


@triton.jit
def _down_tiles(wd_ptr, layer, pid, H, FW, RD: tl.constexpr, BD: tl.constexpr, KD1: tl.constexpr,
                KD2: tl.constexpr):
    w = wd_ptr + (layer + 0 * pid).to(tl.int64) * H * FW
    r0 = pid * RD
    rend = tl.minimum(r0 + RD, H)
    return _tile(w, FW, r0, rend, BD, 0, KD1), _tile(w, FW, r0, rend, BD, KD1, KD2)


@triton.jit
def _gemv(w, xe, xo):
    """Rows of a packed bf16 tile (int32 words: element 2j in the low half) against x's even and odd columns.
    bf16 -> fp32 is a 16-bit shift, so the tile stays two values per register until here."""
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    return tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)


@triton.jit
def _silu_mul(gu_ptr, F, k0, BK: tl.constexpr, ODD: tl.constexpr):
    """silu(gate) * up for columns 2k + ODD, k in [k0, k0+BK), of the (2F,) gate/up row, rounded to the dtype as
    the eager MLP rounds."""
    ks = 2 * (k0 + tl.arange(0, BK)) + ODD
    dt = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(tl.float32)
    u = tl.load(gu_ptr + F + ks, mask=ks < F, other=0.0, cache_modifier=".cg").to(tl.float32)
    return ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)


@triton.jit
def _norm_half(h_ptr, nw_ptr, H, BHW: tl.constexpr, ODD: tl.constexpr):
    hs = 2 * tl.arange(0, BHW) + ODD
    x = tl.load(h_ptr + hs, mask=hs < H, other=0.0, cache_modifier=".cg").to(tl.float32)
    w = tl.load(nw_ptr + hs, mask=hs < H, other=0.0).to(tl.float32)
    return x, (x * w).to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def mlp_stack_kernel(h_ptr, gu_ptr, wgu_ptr, nw_ptr, wd_ptr, bar_ptr, CALLS, NL, eps, H, F, P,
                     RU: tl.constexpr, BU1: tl.constexpr, BU2: tl.constexpr, RD: tl.constexpr, BD: tl.constexpr,
                     KD1: tl.constexpr, KD2: tl.constexpr, BHW: tl.constexpr, DEPTH: tl.constexpr,
                     SYNC: tl.constexpr):
    """CALLS dense MLP layers, layer i % NL on call i, on a (H,) bf16 residual row h updated in place. P
    programs, all resident (the barriers need it). Up stage: this program's RU rows of the stacked (2F, H)
    gate/up weight of RMSNorm(h) -> gu (2F,). Down stage: its RD rows of the (H, F) down weight of
    silu(gate) * up -> h[rows] += . Weights (bf16 pairs as int32 words) held in registers, loaded DEPTH
    stages ahead (1 or 2). SYNC False drops the barriers (wrong results: the weight streams alone, timed)."""
    pid = tl.program_id(0)
    dt = h_ptr.dtype.element_ty
    F2 = 2 * F
    HW = H // 2
    FW = F // 2
    d0 = pid * RD
    drows = d0 + tl.arange(0, BD)
    dmask = (drows < d0 + RD) & (drows < H)
    u1, u2 = _up_tiles(wgu_ptr, 0, pid, F2, HW, RU, BU1, BU2, BHW)
    if DEPTH == 2:
        w1, w2 = _down_tiles(wd_ptr, 0, pid, H, FW, RD, BD, KD1, KD2)
    stage = 0
    for i in range(CALLS):
        layer = i % NL
        nxt = (i + 1) % NL
        # up: h is final (the previous layer's residual adds all arrived)
        if SYNC:
            _wait(bar_ptr, stage * P)
        xe, ne = _norm_half(h_ptr, nw_ptr + layer * H, H, BHW, 0)
        xo, no = _norm_half(h_ptr, nw_ptr + layer * H, H, BHW, 1)
        rstd = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / H + eps)
        r0 = pid * RU
        rend = tl.minimum(r0 + RU, F2)
        ra = r0 + tl.arange(0, BU1)
        tl.store(gu_ptr + ra, (_gemv(u1, ne, no) * rstd).to(dt), mask=ra < rend)
        rb = r0 + BU1 + tl.arange(0, BU2)
        tl.store(gu_ptr + rb, (_gemv(u2, ne, no) * rstd).to(dt), mask=rb < rend)
        if SYNC:
            _arrive(bar_ptr)
        # weights loaded after the release and before the wait: issued before the release add, they measured
        # slower (the release orders every earlier access, loads included, so they did not overlap the wait)
        if DEPTH == 2:
            u1, u2 = _up_tiles(wgu_ptr, nxt, pid, F2, HW, RU, BU1, BU2, BHW)
        else:
            w1, w2 = _down_tiles(wd_ptr, layer, pid, H, FW, RD, BD, KD1, KD2)
        stage += 1
        # down: every program's gate/up rows arrived
        if SYNC:
            _wait(bar_ptr, stage * P)
        y = _gemv(w1, _silu_mul(gu_ptr, F, 0, KD1, 0), _silu_mul(gu_ptr, F, 0, KD1, 1))
        y += _gemv(w2, _silu_mul(gu_ptr, F, KD1, KD2, 0), _silu_mul(gu_ptr, F, KD1, KD2, 1))
        hr = tl.load(h_ptr + drows, mask=dmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(h_ptr + drows, (hr + y.to(dt).to(tl.float32)).to(dt), mask=dmask)
        if SYNC:
            _arrive(bar_ptr)
        if DEPTH == 2:
            w1, w2 = _down_tiles(wd_ptr, nxt, pid, H, FW, RD, BD, KD1, KD2)
        else:
            u1, u2 = _up_tiles(wgu_ptr, nxt, pid, F2, HW, RU, BU1, BU2, BHW)
        stage += 1


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class PersistentMLPStack:
    """The dense MLP layers of a model as one persistent launch of `calls` layers (layer i % len on call i)."""

    def __init__(self, layers, programs: int, depth: int, warps: int, sync: bool = True):
        ff = [l.feed_forward for l in layers]
        self.H = ff[0].down_proj.weight.shape[0]
        self.F = ff[0].down_proj.weight.shape[1]
        if ff[0].down_proj.weight.dtype != torch.bfloat16 or self.H % 2 or self.F % 2:
            raise ValueError("the persistent MLP kernel takes bf16 weights of even widths (read as int32 pairs)")
        self.wgu = torch.stack([torch.cat([f.gate_proj.weight, f.up_proj.weight]) for f in ff]).view(torch.int32)
        self.wd = torch.stack([f.down_proj.weight for f in ff]).contiguous().view(torch.int32)
        self.nw = torch.stack([l.pre_ff_layernorm.weight for l in layers]).contiguous()
        self.eps = layers[0].pre_ff_layernorm.eps
        self.NL = len(layers)
        dev, dt = self.nw.device, ff[0].down_proj.weight.dtype
        self.gu = torch.empty(2 * self.F, device=dev, dtype=dt)
        self.bar = torch.zeros(1, device=dev, dtype=torch.int32)
        self.P, self.depth, self.warps, self.sync = programs, depth, warps, sync
        ru = -(-2 * self.F // programs)
        bu1 = _pow2_floor(ru)
        self.RU, self.BU1, self.BU2 = ru, bu1, _pow2_ceil(max(ru - bu1, 1))
        self.RD = -(-self.H // programs)
        self.BD = _pow2_ceil(self.RD)
        self.KD1 = _pow2_floor(self.F // 2)
        self.KD2 = _pow2_ceil(max(self.F // 2 - self.KD1, 1))

    def _launch(self, h, calls: int, warmup: bool = False):
        fn = mlp_stack_kernel.warmup if warmup else mlp_stack_kernel[(self.P,)]
        kw = dict(grid=(self.P,)) if warmup else {}
        return fn(h, self.gu, self.wgu, self.nw, self.wd, self.bar, calls, self.NL, self.eps, self.H, self.F, self.P,
                  RU=self.RU, BU1=self.BU1, BU2=self.BU2, RD=self.RD, BD=self.BD, KD1=self.KD1, KD2=self.KD2,
                  BHW=_pow2_ceil(self.H // 2), DEPTH=self.depth, SYNC=self.sync, num_warps=self.warps, **kw)

    def resident(self, h) -> int:
        """How many programs of the compiled kernel fit on one SM at once (registers, shared memory, threads)."""
        k = self._launch(h, 1, warmup=True)
        k._init_handles()  # loads the binary: n_regs is known from here
        regs_per_warp = -(-k.n_regs * 32 // 256) * 256
        props = torch.cuda.get_device_properties(h.device)
        by_regs = props.regs_per_multiprocessor // (regs_per_warp * self.warps)
        smem = k.metadata.shared
        by_smem = props.shared_memory_per_multiprocessor // smem if smem else 32
        by_threads = props.max_threads_per_multi_processor // (32 * self.warps)
        return min(by_regs, by_smem, by_threads)

    def __call__(self, h, calls: int):
        self.bar.zero_()
        return self._launch(h, calls)


def eager_mlp_stack(h, layers, calls: int):
    for i in range(calls):
        layer = layers[i % len(layers)]
        h = h + layer.feed_forward(layer.pre_ff_layernorm(h))
    return h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-1b")
    p.add_argument("--calls", type=int, default=64, help="MLP layers per launch / per captured graph")
    p.add_argument("--variants", default="1:8,2:8,1:8:nosync,2:8:nosync,1:8:l2,1:8:nosync-l2",
                   help="DEPTH:WARPS[:FLAGS] of the persistent kernel; flags (joined by -): nosync drops the "
                        "barriers (timing only), l2 repeats the first layer (its weights stay in L2)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_persistent_mlp needs a CUDA GPU (grid-wide barriers between resident programs)")
    from bench_l2_resident import graph_us_per_call
    from openjamba.bench.common import build_model, machine
    from openjamba.config import JambaConfig
    from openjamba.inference import FusedDecodeStep

    model = build_model(JambaConfig.from_name(args.preset), "cuda", torch.bfloat16)
    layers = [l for l in model.model.layers if not l.is_moe]
    ff = layers[0].feed_forward
    nbytes = sum(w.numel() * w.element_size() for w in (ff.gate_proj.weight, ff.up_proj.weight, ff.down_proj.weight))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    h0 = (torch.randn(1, model.config.hidden_size, device="cuda") * 0.5).to(model.dtype)
    h = h0.clone()
    with torch.inference_mode():
        ref = eager_mlp_stack(h0.clone(), layers, 8)
    rows = []
    bad = []  # persistent variants whose result strays from eager by more than the fused step's does
    step = FusedDecodeStep(model, 1)
    for order in ("layers in turn", "same layer"):
        seq = layers if order == "layers in turn" else layers[:1]

        def fused_run():
            h.copy_(h0)
            for i in range(args.calls):
                step.ffn(h, seq[i % len(seq)])

        err = None
        if order == "layers in turn":
            with torch.inference_mode():
                h.copy_(h0)
                for i in range(8):
                    step.ffn(h, layers[i % len(layers)])
            err = fused_err = (h.float() - ref.float()).abs().max().item()
        t = graph_us_per_call(fused_run, args.calls)
        rows.append(dict(kernel="fused step (ffn_up + down_residual, PDL)", order=order, us_per_layer=t,
                         max_err_8_layers=err))
        print(f"fused step kernels, {order:<15} {min(t):7.2f} us per layer ({', '.join(f'{v:.2f}' for v in t)})"
              + (f", error after 8 layers {err:.3g}" if err is not None else ""), flush=True)
    for v in args.variants.split(","):
        depth, warps, *flags = v.split(":")
        depth, warps, flags = int(depth), int(warps), set(flags[0].split("-")) if flags else set()
        sync, order = "nosync" not in flags, "same layer" if "l2" in flags else "layers in turn"
        seq = layers[:1] if "l2" in flags else layers
        stack = PersistentMLPStack(seq, sms, depth, warps, sync=sync)
        name = f"persistent, depth {depth}, {warps} warps, {'barriers' if sync else 'no barriers'}, {order}"
        try:
            if stack.resident(h) < 1:
                raise RuntimeError(f"a program of {warps} warps does not fit on an SM")
            with torch.inference_mode():
                h.copy_(h0)
                k = stack(h, 8)
                torch.cuda.synchronize()
        except Exception as e:  # e.g. too many registers for one program of this many warps
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.append(dict(kernel=name, failed=str(e)[:500]))
            continue
        regs = dict(registers=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None))
        err = (h.float() - ref.float()).abs().max().item() if sync and order == "layers in turn" else None
        if err is not None and err > 2 * fused_err + 0.016:  # bf16 steps of |h| ~ 2 are 0.0156
            bad.append(name)

        def run():
            h.copy_(h0)
            stack(h, args.calls)

        t = graph_us_per_call(run, args.calls)
        rows.append(dict(kernel=name, depth=depth, warps=warps, programs=sms, barriers=sync, order=order,
                         us_per_layer=t, max_err_8_layers=err, **regs))
        print(f"{name:<62} {min(t):7.2f} us per layer ({', '.join(f'{x:.2f}' for x in t)})"
              + (f", error after 8 layers {err:.3g}" if err is not None else "") + f", {regs}", flush=True)
    bound = nbytes / BANDWIDTH * 1e6
    print(f"weights per layer {nbytes / 1e6:.1f} MB: {bound:.2f} us at 4.27 TB/s; |h| after 8 layers "
          f"{ref.float().abs().max().item():.3g}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"persistent_mlp_{torch.cuda.get_device_name().split()[-1].lower()}.json")
    with open(out, "w") as f:
        json.dump(dict(benchmark="dense MLP stack: persistent kernel vs the fused step's PDL kernel chain",
                       preset=args.preset, batch=1, dtype="bfloat16", calls=args.calls, weight_bytes_per_layer=nbytes,
                       bandwidth_bound_us_per_layer=bound, machine=machine(), rows=rows), f, indent=1)
    print(f"wrote {out}")
    if bad:
        print(f"results differ from the eager layers: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
