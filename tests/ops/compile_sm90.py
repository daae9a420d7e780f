"""Compile every Triton kernel of the library for an H100/H200 (sm_90) on a machine without a GPU.

Run by test_compile_sm90.py in a subprocess WITHOUT TRITON_INTERPRET (the interpreter never compiles).
The kernels' launches are recorded instead of run: each wrapper (the selective scan forward and backward,
its chunked passes, the causal conv and its backward and update, the state update, the cross-entropy
forward and backward, the experts' gated activation both ways, AdamW with a float and a device learning
rate, the fused decoding step in both matmul forms, with and without programmatic
dependent launch, one row with and without split layers) is called on CPU tensors with its kernels
replaced by recorders, then every distinct launch is compiled with Triton's NVIDIA backend (ptxas ships
with Triton). Prints one JSON line per compiled kernel; exits non-zero on the first failure.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
           torch.int32: "*i32", torch.bool: "*i1"}
OPTIONS = ("num_warps", "num_stages", "launch_pdl", "maxnreg")
launches = []


class Recorder:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))


def record(module_name: str, *names: str) -> None:
    module = importlib.import_module(module_name)
    for name in names:
        setattr(module, name, Recorder(getattr(module, name)))


def compile_launch(fn, args, kwargs) -> dict:
    params = fn.params
    values = dict(zip((p.name for p in params), args))
    values.update({k: v for k, v in kwargs.items() if k not in OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = POINTER[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    return dict(kernel=fn.__name__, pdl=bool(options.get("launch_pdl")), cubin_bytes=len(compiled.asm["cubin"]),
                waits="griddepcontrol.wait" in ptx)


def run_wrappers() -> None:
    from openjamba import JambaConfig, JambaForCausalLM
    from openjamba.inference import fused
    from openjamba.ops.causal_conv1d.triton import causal_conv1d_triton, causal_conv1d_update_triton
    from openjamba.ops.adamw.triton import adamw_step_triton
    from openjamba.ops.cross_entropy.triton import cross_entropy_triton
    from openjamba.ops.moe import swiglu
    from openjamba.ops.selective_scan import triton as scan
    from openjamba.ops.selective_state_update.triton import selective_state_update_triton

    scan._FAST_EXP = True  # the GPU's exp2 (inline PTX), as on CUDA
    torch.manual_seed(0)
    B, L, D, N = 2, 24, 40, 16
    for dtype in (torch.bfloat16, torch.float32):
        u, delta, z = (torch.randn(B, L, D, dtype=dtype, requires_grad=True) for _ in range(3))
        A = -torch.rand(D, N, requires_grad=True)
        Bm, Cm = (torch.randn(B, L, N, dtype=dtype, requires_grad=True) for _ in range(2))
        Dsk, bias = (torch.randn(D, requires_grad=True) for _ in range(2))
        h0 = torch.randn(B, D, N, requires_grad=True)
        for chunks in (None, 2):
            scan.CHUNKS_OVERRIDE = chunks
            y, h = scan.selective_scan_triton(u, delta, A, Bm, Cm, Dsk, z, bias, True, h0)
            (y.float().sum() + h.sum()).backward()
        scan.CHUNKS_OVERRIDE = None
        x = torch.randn(B, L, D, dtype=dtype, requires_grad=True)
        w = torch.randn(D, 4, dtype=dtype, requires_grad=True)
        init = torch.randn(B, 3, D, dtype=dtype, requires_grad=True)
        causal_conv1d_triton(x, w, torch.randn(D, dtype=dtype), initial_state=init)[0].float().sum().backward()
        causal_conv1d_update_triton(x[:, 0].detach(), torch.randn(B, 3, D, dtype=dtype), w.detach())
        selective_state_update_triton(torch.randn(B, D, N), u[:, 0].detach(), delta[:, 0].detach(), A.detach(),
                                      Bm[:, 0].detach(), Cm[:, 0].detach(), Dsk.detach(), z[:, 0].detach(),
                                      bias.detach(), True)
        # a vocabulary of several 4096-wide tiles (the jamba-1b tile) with a masked tail
        logits = torch.randn(6, 5000, dtype=dtype, requires_grad=True)
        cross_entropy_triton(logits, torch.tensor([1, -100, 4999, 0, 7, 2])).backward()
        gate_up = torch.randn(37, 2 * 300, dtype=dtype, requires_grad=True)
        swiglu._SwiGLU.apply(gate_up).float().sum().backward()
        # AdamW with the clipping and the guard, the learning rate as a float and as a device scalar
        params = [torch.randn(5000, dtype=dtype), torch.randn(3, 7, dtype=dtype)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        for lr in (1e-3, torch.tensor(1e-3)):
            adamw_step_triton(params, *state, [torch.zeros(()) for _ in params], lr, 0.1, 0.9, 0.95, 1e-8,
                              grad_norm=torch.tensor(2.0), max_norm=1.0, found_inf=torch.zeros(()))

    # the fused decoding step, both matmul forms, PDL on and off
    fused.fused_unavailable = lambda model, batch: None
    fused.pdl_unavailable = lambda device: None
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny")).to(torch.bfloat16).eval()
    for batch, pdl, split in ((1, True, True), (1, False, True), (1, True, False), (3, True, None),
                              (3, False, None)):
        step = fused.FusedDecodeStep(model, batch, pdl=pdl, split=split)
        step.ieee, step.elsize = False, 2  # bf16 tensor-core dots, as on a GPU
        with torch.no_grad():
            step(model, torch.zeros(batch, 1, dtype=torch.long), model.new_cache(batch, 16))


def main() -> int:
    record("openjamba.ops.selective_scan.triton", "scan_fwd_kernel", "scan_bwd_kernel")
    record("openjamba.ops.causal_conv1d.triton", "_conv_fwd_kernel", "_conv_bwd_kernel",
           "_conv_update_kernel")
    record("openjamba.ops.selective_state_update.triton", "_ssu_kernel")
    record("openjamba.ops.cross_entropy.triton", "_ce_fwd_kernel", "_ce_bwd_kernel")
    record("openjamba.ops.moe.swiglu", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel")
    record("openjamba.ops.adamw.triton", "_adamw_kernel")
    record("openjamba.inference.fused_kernels", "norm_linear_kernel", "qkv_kernel", "mamba_in_kernel",
           "mamba_ssm_kernel", "router_kernel", "ffn_up_kernel", "down_residual_kernel", "ffn_split_kernel",
           "attn_split_kernel", "attn_combine_kernel")
    run_wrappers()
    seen = set()
    for fn, args, kwargs in launches:
        key = (fn.__name__, repr([(p.name, args[i] if i < len(args) else kwargs.get(p.name))
                                  for i, p in enumerate(fn.params) if p.is_constexpr]),
               repr({k: kwargs.get(k) for k in OPTIONS}),
               repr([a.dtype for a in args if isinstance(a, torch.Tensor)]))
        if key in seen:
            continue
        seen.add(key)
        print(json.dumps(compile_launch(fn, args, kwargs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
