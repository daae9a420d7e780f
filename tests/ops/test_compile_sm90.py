"""Every Triton kernel compiles for an H100/H200 (sm_90), on any machine.

The CPU tests run the kernels in the Triton interpreter, which never compiles them and never takes their
GPU-only branches (the hardware exp2, programmatic dependent launch). compile_sm90.py records each
wrapper's launches and compiles them with Triton's NVIDIA backend, in a subprocess without
TRITON_INTERPRET. On a machine with CUDA the GPU tests compile and run them for real instead."""

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for the GPU present")
@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton has no NVIDIA backend (ptxas)")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_sm90.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    names = {d["kernel"] for d in done}
    assert names == {"scan_fwd_kernel", "scan_bwd_kernel", "_conv_fwd_kernel", "_conv_bwd_kernel",
                     "_conv_update_kernel", "_ssu_kernel", "norm_linear_kernel", "qkv_kernel",
                     "mamba_in_kernel", "mamba_ssm_kernel", "router_kernel", "ffn_up_kernel", "down_residual_kernel", "ffn_split_kernel",
                     "attn_split_kernel", "attn_combine_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel",
                     "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_adamw_kernel"}, names
    assert all(d["cubin_bytes"] > 0 for d in done)
    # under programmatic dependent launch every fused kernel waits for the previous one; otherwise none does
    assert all(d["waits"] == d["pdl"] for d in done)
    assert any(d["pdl"] for d in done)
