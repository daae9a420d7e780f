"""Distributed training: FSDP2 and expert parallelism on 2 processes match one process; checkpoints
move between world sizes.

The 2-process runs go through torchrun and tests/train/dist_run.py (gloo on CPU; NCCL in the GPU test).
The single-process reference averages the losses of the same two halves of each global batch, which is
exactly what data parallelism over two ranks optimises (the MoE load-balancing loss is per rank).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.train.distributed import (DistInfo, clip_grad_norm_, full_model_state_dict, init_distributed,
                                         load_distributed_state, parallelize, save_distributed_state)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS, SAVE_AFTER = 6, 2
RTOL = 1e-5  # per-step relative tolerance: reduction orders differ, so runs are not bit-exact

_spec = importlib.util.spec_from_file_location("dist_run", os.path.join(HERE, "dist_run.py"))
dist_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dist_run)


def torchrun(*args, nproc: int = 2, timeout: int = 180) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def run_train(out, *args, nproc=2, device="cpu"):
    torchrun("tests/train/dist_run.py", "train", "--out", str(out), "--device", device,
             "--steps", str(STEPS), *map(str, args), nproc=nproc)
    with open(out) as f:
        return json.load(f)


def assert_same_curve(got: dict, ref: dict, rtol: float = RTOL) -> None:
    for key in ("losses", "grad_norms"):
        a, b = torch.tensor(got[key], dtype=torch.float64), torch.tensor(ref[key], dtype=torch.float64)
        assert a.shape == b.shape, key
        rel = ((a - b).abs() / b.abs()).max().item()
        assert rel < rtol, f"{key}: max relative difference {rel:.2e}\n got {got[key]}\n ref {ref[key]}"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_ckpts")


@pytest.fixture(scope="module")
def reference(ckpts):
    """One process, world 1, the loss averaged over the two halves of each global batch; saves after
    step SAVE_AFTER."""
    result = dist_run.train(init_distributed(), steps=STEPS, save=str(ckpts / "w1"), save_after=SAVE_AFTER)
    assert result["losses"][-1] < result["losses"][0] - 0.2  # it learns, so the curve means something
    return result


def test_fsdp_two_processes_match_one(reference, tmp_path):
    assert_same_curve(run_train(tmp_path / "fsdp.json"), reference)


def test_expert_parallel_module_matches_single_device(tmp_path):
    torchrun("tests/train/dist_run.py", "experts", "--out", str(tmp_path / "e.json"))
    for name in ("e.json", "e.json.rank1"):  # both ranks checked their own slice
        with open(tmp_path / name) as f:
            res = json.load(f)
        for case in ("uniform", "skewed"):  # skewed: rank 1 receives no tokens at all
            errs = res[case]
            assert errs["out_scale"] > 0.1
            for key in ("out", "grad_x", "grad_w", "grad_gate_up", "grad_down"):
                assert errs[key] < 1e-5, (name, case, key, errs[key])


def _same_files(a, b, exact=True):
    for fname in ("model.safetensors", "optimizer.safetensors"):
        x, y = load_file(os.path.join(a, fname)), load_file(os.path.join(b, fname))
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].shape == y[k].shape, k
            if exact:
                assert torch.equal(x[k], y[k]), k
            else:
                torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)
    with open(os.path.join(a, "optimizer.json")) as f1, open(os.path.join(b, "optimizer.json")) as f2:
        assert json.load(f1) == json.load(f2)


def test_fsdp_expert_parallel_match_one_and_checkpoint_world2_to_world1(reference, ckpts):
    """2 processes, FSDP2 + EP=2 + activation checkpointing, follow the one-process curve; the checkpoint
    they save after step SAVE_AFTER continues it at world 1. One test, not two sharing a fixture: under
    pytest-xdist a module fixture runs once per worker that needs it, and this run is one of the slowest."""
    ep_run = run_train(ckpts / "ep.json", "--ep", 2, "--ac", "--save", ckpts / "w2", "--save-after", SAVE_AFTER)
    assert_same_curve(ep_run, reference)
    w2, again = ckpts / "w2", ckpts / "w2_at_w1"
    cont = dist_run.train(init_distributed(), steps=STEPS, start=SAVE_AFTER + 1, load=str(w2), resave=str(again))
    _same_files(w2, again)  # loaded at world 1 = what world 2 (EP=2) saved, experts in the full layout
    _same_files(w2, ckpts / "w1", exact=False)  # and what the one-process run saved at the same step
    tail = {k: v[SAVE_AFTER + 1:] for k, v in reference.items()}
    assert_same_curve(cont, tail)


def test_checkpoint_world1_to_world2(reference, ckpts):
    w1, again = ckpts / "w1", ckpts / "w1_at_w2"
    cont = run_train(ckpts / "cont.json", "--ep", 2, "--from-step", SAVE_AFTER + 1, "--load", w1,
                     "--resave", again)
    _same_files(w1, again)
    tail = {k: v[SAVE_AFTER + 1:] for k, v in reference.items()}
    assert_same_curve(cont, tail)


def test_world1_tied_embeddings_round_trip(tmp_path):
    """No process group: the same API works, and tied weights (shared storage) are saved and restored."""
    dist = init_distributed()
    assert (dist.world_size, dist.rank, dist.is_main, dist.initialized) == (1, 0, True, False)
    torch.manual_seed(0)
    cfg = JambaConfig.from_name("jamba-tiny", tie_word_embeddings=True)
    model = parallelize(JambaForCausalLM(cfg), dist, activation_checkpointing=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    save_distributed_state(model, opt, tmp_path, dist)
    sd = full_model_state_dict(model, dist)
    assert set(sd) == set(JambaForCausalLM(cfg).state_dict())  # plain names, no wrapper prefixes

    torch.manual_seed(1)
    dist = SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    other = parallelize(JambaForCausalLM(cfg), dist)  # any object with DistInfo's fields will do
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    load_distributed_state(other, other_opt, tmp_path, dist)
    assert other.lm_head.weight is other.model.embed_tokens.weight  # still tied
    for k, v in full_model_state_dict(other, dist).items():
        assert torch.equal(v, sd[k]), k
    a, b = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_clip_grad_norm_matches_torch_on_one_process():
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm_(model, 0.1, DistInfo())
    ours = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad.copy_(g)
    want = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.1)
    assert want > 0.1  # clipping really happened
    torch.testing.assert_close(norm, want)
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_parallelize_rejects_bad_settings():
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))  # 4 experts
    with pytest.raises(ValueError, match="divide world_size"):
        parallelize(model, DistInfo(world_size=2), expert_parallel=4)
    with pytest.raises(ValueError, match="divide num_experts"):
        parallelize(model, DistInfo(world_size=3), expert_parallel=3)
    with pytest.raises(ValueError, match="fsdp=True"):
        parallelize(model, DistInfo(world_size=2), fsdp=False)


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    torchrun("benchmarks/bench_distributed.py", "--device", "cpu", "--preset", "jamba-tiny", "--batch", "2",
             "--seq", "16", "--steps", "2", "--warmup", "1", "--out", str(out))
    with open(out) as f:
        res = json.load(f)
    assert res["world_size"] == 2 and res["expert_parallel"] == 2
    assert res["single_device"]["tokens_per_s"] > 0 and res["distributed"]["tokens_per_s"] > 0
    assert 0 < res["scaling_efficiency"] == pytest.approx(
        res["distributed"]["tokens_per_s"] / (2 * res["single_device"]["tokens_per_s"]))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_nccl_fsdp_expert_parallel_match_one_gpu(tmp_path):
    """Same checks as the CPU tests, with NCCL and the default (GPU) ops backend, fp32 without TF32."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.cuda.set_device(0)
        ref = dist_run.train(DistInfo(device=torch.device("cuda", 0)), steps=STEPS, save=str(tmp_path / "g1"),
                             save_after=SAVE_AFTER)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    # GPU kernels reduce in other orders than the CPU ones: a looser tolerance than on CPU
    got = run_train(tmp_path / "ep.json", "--ep", 2, "--ac", "--save", tmp_path / "g2", "--save-after",
                    SAVE_AFTER, device="cuda")
    assert_same_curve(got, ref, rtol=1e-4)
    assert_same_curve(run_train(tmp_path / "fsdp.json", device="cuda"), ref, rtol=1e-4)
    cont = run_train(tmp_path / "cont.json", "--ep", 2, "--from-step", SAVE_AFTER + 1, "--load", tmp_path / "g1",
                     device="cuda")
    assert_same_curve(cont, {k: v[SAVE_AFTER + 1:] for k, v in ref.items()}, rtol=1e-4)
    _same_files(tmp_path / "g1", tmp_path / "g2", exact=False)
