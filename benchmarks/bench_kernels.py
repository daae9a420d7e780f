"""Benchmark the Triton kernels on a CUDA GPU; writes benchmarks/results/kernels_<gpu>.json and .md.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--sweep] [--out benchmarks/results]

Selective scan forward and forward+backward at the (B, D, L, N) shapes of the mamba-ssm anchors (bf16
inputs, our channel-last layout), against the PyTorch reference measured in the same run and the anchor
figures; decode step of a jamba-1b Mamba layer (hidden 1024, D=2048, N=16, K=4) at batch 1 and 64;
causal conv1d; the MoE layer against a dense GEMM of the same active FLOPs; the fused cross-entropy of a
jamba-1b training step against F.cross_entropy on fp32 logits. Times are medians of triton.testing.do_bench.
--sweep also times several scan tile configurations and cross-entropy vocabulary tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from openjamba.ops.causal_conv1d.reference import causal_conv1d_ref
from openjamba.ops.causal_conv1d.triton import causal_conv1d_triton, causal_conv1d_update_triton
from openjamba.ops.cross_entropy import triton as ce_mod
from openjamba.ops.moe.grouped import moe_experts_grouped
from openjamba.ops.selective_scan import triton as scan_mod
from openjamba.ops.selective_scan.reference import selective_scan_chunked
from openjamba.ops.selective_state_update.triton import selective_state_update_triton

# mamba-ssm 2.3.2 CUDA kernel on this H200 (shared/anchors.md): (B, D, L, N) -> (fwd ms, fwd+bwd ms)
ANCHORS = {(4, 4096, 2048, 16): (0.594, 2.92), (1, 8192, 16384, 16): (3.01, 12.4), (16, 2048, 4096, 16): (2.29, 11.4)}
DEV = "cuda"


def bench(fn, grad_to_none=None, rep=200):
    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def scan_inputs(b, D, L, N, grad):
    bf = torch.bfloat16
    x = dict(u=torch.randn(b, L, D, device=DEV, dtype=bf),
             delta=(torch.randn(b, L, D, device=DEV) * 0.5 - 2).to(bf),
             A=-torch.arange(1, N + 1, device=DEV, dtype=torch.float32).repeat(D, 1),
             B=torch.randn(b, L, N, device=DEV, dtype=bf), C=torch.randn(b, L, N, device=DEV, dtype=bf),
             D_skip=torch.ones(D, device=DEV), z=torch.randn(b, L, D, device=DEV, dtype=bf),
             delta_bias=torch.rand(D, device=DEV) * 0.1)
    if grad:
        for v in x.values():
            v.requires_grad_()
    return x


def scan_call(fn, x):
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D_skip"], x["z"], x["delta_bias"], True, None)


def time_scan(fn, shape, rep=200):
    b, D, L, N = shape
    x = scan_inputs(b, D, L, N, grad=False)
    with torch.no_grad():
        fwd = bench(lambda: scan_call(fn, x), rep=rep)
    xg = scan_inputs(b, D, L, N, grad=True)
    gy = torch.randn(b, L, D, device=DEV, dtype=torch.bfloat16)

    def fb():
        y, _ = scan_call(fn, xg)
        y.backward(gy)

    fwdbwd = bench(fb, grad_to_none=list(xg.values()), rep=rep)
    return fwd, fwdbwd


def scan_section(sweep):
    rows, sweep_rows = [], []
    # ((BLOCK_T, BLOCK_D, warps[, maxnreg]) forward, (BLOCK_T, BLOCK_D, warps[, maxnreg]) backward,
    # sequence chunks); None = the built-in table and chunking heuristic
    configs = [None] + ([((8, 32, 2), (4, 16, 2), 1), ((8, 8, 1), (4, 16, 1), 1), ((4, 16, 1), (4, 8, 1, 128), 1),
                         ((8, 16, 1, 128), (4, 8, 1), None)] if sweep else [])
    for shape, (a_f, a_fb) in ANCHORS.items():
        b, D, L, N = shape
        best = None
        for cfg in configs:
            scan_mod.CONFIG_OVERRIDE = cfg[:2] if cfg else None
            scan_mod.CHUNKS_OVERRIDE = cfg[2] if cfg else None
            try:
                f, fb = time_scan(scan_mod.selective_scan_triton, shape, rep=100 if cfg is None else 60)
                sweep_rows.append(dict(shape=shape, config=cfg, fwd_ms=f, fwdbwd_ms=fb))
                print(f"sweep {shape} (fwd, bwd) (BT, BD, warps) = {cfg}: fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)
                if best is None or fb < best[2]:
                    best = (cfg, best[1] if best else None, fb)
                if best[1] is None or f < best[1][1]:
                    best = (best[0], (cfg, f), best[2])
            except Exception as e:  # a tile too large for registers/shared memory: report and go on
                print(f"sweep {shape} {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
        scan_mod.CONFIG_OVERRIDE = scan_mod.CHUNKS_OVERRIDE = None
        # the fastest forward and the fastest forward+backward configurations (the built-in table when not sweeping)
        cfg, (fcfg, f), fb = best
        io = b * L * D * 2
        fwd_bytes = 4 * io + 2 * b * L * N * 2  # u, delta, z read; y written; B, C read
        bwd_bytes = 7 * io + 4 * b * L * N * 2  # + dy read; du, ddelta, dz written; dB, dC
        row = dict(shape_BDLN=shape, fwd_config=fcfg or "default", config=cfg or "default", fwd_ms=f, fwdbwd_ms=fb, fwd_GBps=fwd_bytes / f / 1e6,
                   fwdbwd_GBps=(fwd_bytes + bwd_bytes) / fb / 1e6, anchor_fwd_ms=a_f, anchor_fwdbwd_ms=a_fb,
                   ratio_fwd_vs_anchor=f / a_f, ratio_fwdbwd_vs_anchor=fb / a_fb)
        if shape == (4, 4096, 2048, 16):  # the reference is slow and memory-hungry: smallest shape only
            try:
                rf, rfb = time_scan(selective_scan_chunked, shape, rep=100)
                row.update(ref_fwd_ms=rf, ref_fwdbwd_ms=rfb, speedup_fwd_vs_ref=rf / f, speedup_fwdbwd_vs_ref=rfb / fb)
            except torch.OutOfMemoryError:
                row.update(ref_note="reference ran out of memory")
            torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    return rows, sweep_rows


def rms(x, eps=1e-6):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def graph_us(fn, reps=20):
    """Microseconds per call of fn, from a CUDA graph holding `reps` calls (launch gaps amortised)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return bench(g.replay) * 1e3 / reps


def decode_section():
    """One decode step of a jamba-1b Mamba layer (weights bf16, SSM state fp32), CUDA-graph replayed."""
    Hd, D, N, K, R = 1024, 2048, 16, 4, 64
    bf = torch.bfloat16
    W_in = torch.randn(2 * D, Hd, device=DEV, dtype=bf) * 0.02
    W_x = torch.randn(R + 2 * N, D, device=DEV, dtype=bf) * 0.02
    W_dt = torch.randn(D, R, device=DEV, dtype=bf) * 0.1
    W_out = torch.randn(Hd, D, device=DEV, dtype=bf) * 0.02
    conv_w, conv_b = torch.randn(D, K, device=DEV, dtype=bf), torch.randn(D, device=DEV, dtype=bf)
    A = -torch.arange(1, N + 1, device=DEV, dtype=torch.float32).repeat(D, 1)
    Dk, dt_bias = torch.ones(D, device=DEV), torch.rand(D, device=DEV)
    weight_bytes = sum(t.numel() * t.element_size() for t in (W_in, W_x, W_dt, W_out, conv_w, conv_b, A, Dk, dt_bias))
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, Hd, device=DEV, dtype=bf)
        ssm = torch.randn(batch, D, N, device=DEV)
        conv_state = torch.randn(batch, K - 1, D, device=DEV, dtype=bf)

        def step():
            u, z = F.linear(x, W_in).chunk(2, dim=-1)
            u = causal_conv1d_update_triton(u, conv_state, conv_w, conv_b)
            dt, Bm, Cm = F.linear(u, W_x).split([R, N, N], dim=-1)
            delta = F.linear(rms(dt), W_dt)
            y = selective_state_update_triton(ssm, u, delta, A, rms(Bm), rms(Cm), Dk, z, dt_bias)
            return F.linear(y, W_out)

        layer_us = graph_us(step)
        layer_bytes = weight_bytes + batch * (2 * D * N * 4 + 2 * (K - 1) * D * 2 + 2 * Hd * 2)
        u = torch.randn(batch, D, device=DEV, dtype=bf)
        dl = torch.randn(batch, D, device=DEV, dtype=bf)
        Bm, Cm = torch.randn(batch, N, device=DEV, dtype=bf), torch.randn(batch, N, device=DEV, dtype=bf)
        ssu_us = graph_us(lambda: selective_state_update_triton(ssm, u, dl, A, Bm, Cm, Dk, u, dt_bias))
        ssu_bytes = 2 * batch * D * N * 4 + D * N * 4 + 4 * batch * D * 2
        rows.append(dict(batch=batch, layer_graph_us=layer_us, layer_bytes=layer_bytes,
                         layer_GBps=layer_bytes / layer_us / 1e3, ssu_kernel_us=ssu_us,
                         ssu_GBps=ssu_bytes / ssu_us / 1e3))
        print(rows[-1], flush=True)
    return rows


def mamba_layer_section(batch=8, L=2048):
    """A jamba-1b Mamba mixer (projections included) forward+backward, bf16, and the scan's share of it."""
    Hd, D, N, K, R = 1024, 2048, 16, 4, 64
    bf = torch.bfloat16
    p = dict(W_in=torch.randn(2 * D, Hd) * 0.02, W_x=torch.randn(R + 2 * N, D) * 0.02, W_dt=torch.randn(D, R) * 0.1,
             W_out=torch.randn(Hd, D) * 0.02, conv_w=torch.randn(D, K) * 0.3, conv_b=torch.zeros(D))
    p = {k: v.to(DEV, bf).requires_grad_() for k, v in p.items()}
    A = (-torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1)).to(DEV).requires_grad_()
    Dk, dt_bias = torch.ones(D, device=DEV, requires_grad=True), torch.rand(D, device=DEV, requires_grad=True)
    x = torch.randn(batch, L, Hd, device=DEV, dtype=bf, requires_grad=True)
    gy = torch.randn(batch, L, Hd, device=DEV, dtype=bf)
    leaves = [x, A, Dk, dt_bias, *p.values()]

    def layer():
        u, z = F.linear(x, p["W_in"]).chunk(2, dim=-1)
        u, _ = causal_conv1d_triton(u, p["conv_w"], p["conv_b"], "silu")
        dt, Bm, Cm = F.linear(u, p["W_x"]).split([R, N, N], dim=-1)
        delta = F.linear(rms(dt), p["W_dt"])
        y, _ = scan_mod.selective_scan_triton(u, delta, A, rms(Bm), rms(Cm), Dk, z, dt_bias, True, None)
        return F.linear(y, p["W_out"])

    fb = bench(lambda: layer().backward(gy), grad_to_none=leaves)
    with torch.no_grad():
        f = bench(layer)
    flops = 2 * batch * L * (2 * D * Hd + (R + 2 * N) * D + R * D + Hd * D)  # projections only
    row = dict(batch=batch, L=L, fwd_ms=f, fwdbwd_ms=fb, proj_TFLOPs_fwdbwd=3 * flops / fb / 1e9)
    print(row, flush=True)
    return row


def conv_section():
    rows = []
    for (b, L, D) in [(8, 2048, 2048), (1, 16384, 8192)]:
        x = torch.randn(b, L, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(D, 4, device=DEV, requires_grad=True)
        bias = torch.randn(D, device=DEV, requires_grad=True)
        gy = torch.randn(b, L, D, device=DEV, dtype=torch.bfloat16)
        res = dict(shape_BLD=(b, L, D))
        for name, fn in (("triton", causal_conv1d_triton), ("ref", causal_conv1d_ref)):
            with torch.no_grad():
                res[f"{name}_fwd_ms"] = bench(lambda: fn(x, w, bias, "silu"))

            def fb():
                y, _ = fn(x, w, bias, "silu")
                y.backward(gy)

            res[f"{name}_fwdbwd_ms"] = bench(fb, grad_to_none=[x, w, bias])
        res["fwd_GBps"] = 2 * b * L * D * 2 / res["triton_fwd_ms"] / 1e6
        rows.append(res)
        print(res, flush=True)
    return rows


def moe_section():
    T, Hd, Fd, X, K = 16384, 1024, 2816, 8, 2
    bf = torch.bfloat16
    x = torch.randn(T, Hd, device=DEV, dtype=bf, requires_grad=True)
    t = torch.arange(T, device=DEV)
    idx = torch.stack([t % X, (t + X // 2) % X], 1)  # balanced: every expert gets T*K/X rows
    w = torch.rand(T, K, device=DEV, requires_grad=True)
    wg = (torch.randn(X, 2 * Fd, Hd, device=DEV) * 0.02).to(bf).requires_grad_()
    wd = (torch.randn(X, Hd, Fd, device=DEV) * 0.02).to(bf).requires_grad_()
    xd = torch.randn(T * K, Hd, device=DEV, dtype=bf, requires_grad=True)
    dg = (torch.randn(2 * Fd, Hd, device=DEV) * 0.02).to(bf).requires_grad_()
    dd = (torch.randn(Hd, Fd, device=DEV) * 0.02).to(bf).requires_grad_()

    def dense():
        g_, u_ = F.linear(xd, dg).chunk(2, -1)
        return F.linear(F.silu(g_) * u_, dd)

    flops = 2 * T * K * 3 * Hd * Fd
    gy, gyd = torch.randn(T, Hd, device=DEV, dtype=bf), torch.randn(T * K, Hd, device=DEV, dtype=bf)
    with torch.no_grad():
        moe_f = bench(lambda: moe_experts_grouped(x, w, idx, wg, wd))
        dense_f = bench(dense)
    moe_fb = bench(lambda: moe_experts_grouped(x, w, idx, wg, wd).backward(gy), grad_to_none=[x, w, wg, wd])
    dense_fb = bench(lambda: dense().backward(gyd), grad_to_none=[xd, dg, dd])
    row = dict(T=T, H=Hd, F=Fd, experts=X, top_k=K, moe_fwd_ms=moe_f, dense_fwd_ms=dense_f,
               moe_fwd_TFLOPs=flops / moe_f / 1e9, dense_fwd_TFLOPs=flops / dense_f / 1e9,
               moe_vs_dense_fwd=dense_f / moe_f, moe_fwdbwd_ms=moe_fb, dense_fwdbwd_ms=dense_fb,
               moe_vs_dense_fwdbwd=dense_fb / moe_fb)
    # where the MoE time goes: one grouped GEMM with the weights as stored (a transposed view) or copied
    offs = torch.arange(1, X + 1, device=DEV, dtype=torch.int32) * (T * K // X)
    with torch.no_grad():
        row["grouped_mm_gate_up_view_ms"] = bench(lambda: torch._grouped_mm(xd, wg.transpose(-2, -1), offs=offs))
        wgt = wg.transpose(-2, -1).contiguous()
        row["grouped_mm_gate_up_contig_ms"] = bench(lambda: torch._grouped_mm(xd, wgt, offs=offs))
        row["dense_mm_gate_up_ms"] = bench(lambda: F.linear(xd, dg))
    print(row, flush=True)
    return row


def ce_section(sweep):
    """Loss of a jamba-1b training step: 8 x 2048 tokens, vocabulary 32768, bf16 logits. The fused op reads
    the logits once forward and once backward and writes their gradient; F.cross_entropy on logits.float()
    (the trainer's loss before the fused op) also makes an fp32 copy, a log-softmax and their gradients."""
    T, V = 16384, 32768
    logits = torch.randn(T, V, device=DEV, dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (T,), device=DEV)
    fns = (("triton", lambda: ce_mod.cross_entropy_triton(logits, t)),
           ("ref", lambda: F.cross_entropy(logits.float(), t)))
    row = dict(T=T, V=V)
    for name, fn in fns:
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = bench(fn)
        row[f"{name}_fwdbwd_ms"] = bench(lambda: fn().backward(), grad_to_none=[logits])
        # memory beyond the logits and their gradient, at the peak of a forward+backward
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        row[f"{name}_extra_GB"] = (torch.cuda.max_memory_allocated() - base - logits.numel() * 2) / 1e9
        logits.grad = None
    io = T * V * 2
    row.update(fwd_GBps=io / row["triton_fwd_ms"] / 1e6, fwdbwd_GBps=3 * io / row["triton_fwdbwd_ms"] / 1e6,
               speedup_fwd=row["ref_fwd_ms"] / row["triton_fwd_ms"],
               speedup_fwdbwd=row["ref_fwdbwd_ms"] / row["triton_fwdbwd_ms"], block_v="default", sweep=[])
    for bv in ((2048, 8192, 16384) if sweep else ()):
        ce_mod.BLOCK_V_OVERRIDE = bv
        try:
            with torch.no_grad():
                f = bench(fns[0][1], rep=100)
            fb = bench(lambda: fns[0][1]().backward(), grad_to_none=[logits], rep=100)
            row["sweep"].append(dict(block_v=bv, fwd_ms=f, fwdbwd_ms=fb))
            print(f"cross-entropy BLOCK_V={bv}: fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)
        except Exception as e:  # a tile too large for registers: report and go on
            print(f"cross-entropy BLOCK_V={bv}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
    ce_mod.BLOCK_V_OVERRIDE = None
    print(row, flush=True)
    return row


def markdown(res):
    lines = [f"# Kernel benchmarks on {res['device']} (torch {res['torch']}, triton {res['triton']})", "",
             "## Selective scan, bf16, channel-last (B, L, D); mamba-ssm anchor figures from shared/anchors.md", "",
             "| B, D, L, N | fwd ms | anchor fwd | ratio | fwd+bwd ms | anchor fwd+bwd | ratio | fwd GB/s | vs PyTorch ref (fwd / fwd+bwd) | fwd config | fwd+bwd config |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["scan"]:
        ref = (f"{r['speedup_fwd_vs_ref']:.0f}x / {r['speedup_fwdbwd_vs_ref']:.0f}x" if "speedup_fwd_vs_ref" in r else "-")
        lines.append(f"| {r['shape_BDLN']} | {r['fwd_ms']:.3f} | {r['anchor_fwd_ms']} | {r['ratio_fwd_vs_anchor']:.2f} | "
                     f"{r['fwdbwd_ms']:.3f} | {r['anchor_fwdbwd_ms']} | {r['ratio_fwdbwd_vs_anchor']:.2f} | "
                     f"{r['fwd_GBps']:.0f} | {ref} | {r['fwd_config']} | {r['config']} |")
    lines += ["", "config: ((BLOCK_T, BLOCK_D, warps[, maxnreg]) forward, same backward, sequence chunks (None: heuristic)); the fastest of the sweep for each column."]
    for key in ("decode", "conv", "mamba_layer", "moe", "cross_entropy"):
        if res.get(key) is None:
            lines += ["", f"{key}: failed ({res.get(key + '_error')})"]
    lines += ["", "## Decode step, jamba-1b Mamba layer (CUDA graph), and the state-update kernel alone", "",
              "| batch | layer us | layer GB/s | ssu kernel us | ssu GB/s |", "|---|---|---|---|---|"]
    for r in res["decode"] or []:
        lines.append(f"| {r['batch']} | {r['layer_graph_us']:.1f} | {r['layer_GBps']:.0f} | {r['ssu_kernel_us']:.1f} | {r['ssu_GBps']:.0f} |")
    lines += ["", "## Causal conv1d (K=4, bf16, SiLU)", "",
              "| B, L, D | triton fwd ms | ref fwd ms | triton fwd+bwd ms | ref fwd+bwd ms | fwd GB/s |", "|---|---|---|---|---|---|"]
    for r in res["conv"] or []:
        lines.append(f"| {r['shape_BLD']} | {r['triton_fwd_ms']:.3f} | {r['ref_fwd_ms']:.3f} | {r['triton_fwdbwd_ms']:.3f} | "
                     f"{r['ref_fwdbwd_ms']:.3f} | {r['fwd_GBps']:.0f} |")
    r = res["mamba_layer"]
    if r is not None:
        lines += ["", f"## jamba-1b Mamba mixer (projections, conv, scan), batch {r['batch']} x {r['L']} tokens, bf16",
                  "", f"forward {r['fwd_ms']:.2f} ms, forward+backward {r['fwdbwd_ms']:.2f} ms "
                  f"(projection FLOPs alone would run at {r['proj_TFLOPs_fwdbwd']:.0f} TFLOP/s over that time)"]
    c = res.get("cross_entropy")
    if c is not None:
        lines += ["", f"## Cross-entropy, {c['T']} tokens x {c['V']} vocabulary, bf16 logits (fused vs "
                  "F.cross_entropy(logits.float(), t))", "",
                  "| | fused ms | GB/s | F.cross_entropy ms | speedup | extra memory fused / F.cross_entropy |",
                  "|---|---|---|---|---|---|",
                  f"| fwd | {c['triton_fwd_ms']:.3f} | {c['fwd_GBps']:.0f} | {c['ref_fwd_ms']:.3f} | "
                  f"{c['speedup_fwd']:.1f}x | |",
                  f"| fwd+bwd | {c['triton_fwdbwd_ms']:.3f} | {c['fwdbwd_GBps']:.0f} | {c['ref_fwdbwd_ms']:.3f} | "
                  f"{c['speedup_fwdbwd']:.1f}x | {c['triton_extra_GB']:.2f} GB / {c['ref_extra_GB']:.2f} GB |"]
        for r in c["sweep"]:
            lines.append(f"| BLOCK_V={r['block_v']} fwd / fwd+bwd | {r['fwd_ms']:.3f} / {r['fwdbwd_ms']:.3f} | | | | |")
    m = res["moe"]
    if m is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"## MoE layer, {m['T']} tokens, H={m['H']}, F={m['F']}, {m['experts']} experts top-{m['top_k']}, balanced", "",
              "| | grouped MoE | dense GEMM, same active FLOPs | MoE / dense throughput |", "|---|---|---|---|",
              f"| fwd ms | {m['moe_fwd_ms']:.3f} ({m['moe_fwd_TFLOPs']:.0f} TFLOP/s) | {m['dense_fwd_ms']:.3f} ({m['dense_fwd_TFLOPs']:.0f} TFLOP/s) | {m['moe_vs_dense_fwd']:.2f} |",
              f"| fwd+bwd ms | {m['moe_fwdbwd_ms']:.3f} | {m['dense_fwdbwd_ms']:.3f} | {m['moe_vs_dense_fwdbwd']:.2f} |"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    res = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_").replace("nvidia_", "")
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every section, so a run cut short keeps what it measured
        with open(os.path.join(args.out, f"kernels_{tag}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)

    res["scan"], res["scan_sweep"] = scan_section(args.sweep)
    save()
    for key, fn in (("decode", decode_section), ("conv", conv_section), ("mamba_layer", mamba_layer_section),
                    ("moe", moe_section), ("cross_entropy", lambda: ce_section(args.sweep))):
        try:
            res[key] = fn()
        except Exception as e:  # keep the other sections' numbers; the table says what failed
            res[key] = None
            res[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
            print(key, "failed:", res[f"{key}_error"], flush=True)
        torch.cuda.empty_cache()
        save()
    md = markdown(res)
    with open(os.path.join(args.out, f"kernels_{tag}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
