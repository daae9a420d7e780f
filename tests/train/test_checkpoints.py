"""Training checkpoints: atomic writes, keep-last-N, RNG round trip, bit-identical resume after SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from openjamba.config import JambaConfig
from openjamba.model import JambaForCausalLM
from openjamba.train import checkpointing as ckpt
from openjamba.train.config import TrainConfig, to_toml
from openjamba.train.optim import build_optimizer
from train_helpers import read_jsonl, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    opt = build_optimizer(model, TrainConfig().optim, model.device)
    x = torch.randint(0, 128, (2, 9))
    model(x, labels=x).loss.backward()
    opt.step()
    return model, opt


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_optimizer()
    manager = ckpt.CheckpointManager(str(tmp_path))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpt.save_checkpoint(manager, 7, model, opt, {"step": 7, "data": {"epoch": 0, "position": 3}})
    expect = (random.random(), np.random.rand(), torch.rand(1))
    assert manager.latest() == path and sorted(os.listdir(path)) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]
    other, other_opt = _model_and_optimizer(seed=5)
    assert not _state_equal(model, other)
    state = ckpt.load_checkpoint(path, other, other_opt)
    assert state["step"] == 7 and state["data"]["position"] == 3
    assert _state_equal(model, other)
    so, st = opt.state_dict(), other_opt.state_dict()
    assert so["param_groups"] == st["param_groups"]
    for i, s in so["state"].items():
        assert all(torch.equal(v, st["state"][i][k]) for k, v in s.items())
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect


def test_crash_mid_write_leaves_latest_valid(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    manager = ckpt.CheckpointManager(str(tmp_path))
    ckpt.save_checkpoint(manager, 1, model, opt, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = ckpt.save_file

    def dying_save(tensors, path, *a, **k):  # the optimizer file is half written when the "crash" hits
        if path.endswith("optimizer.safetensors"):
            with open(path, "wb") as f:
                f.write(b"\x00" * 10)
            raise KeyboardInterrupt("simulated crash")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)  # the writers import it at call time
    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(manager, 2, model, opt, {"step": 2})
    assert manager.latest() == manager.path(1) and manager.steps() == [1]
    # A crash after the directory is in place but before `latest` is replaced: still step 1.
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    monkeypatch.setattr(ckpt, "save_file", real_save)
    real_replace = os.replace

    def dying_replace(src, dst):
        if os.path.basename(dst) == ckpt.LATEST:
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(manager, 2, model, opt, {"step": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert manager.latest() == manager.path(1)
    assert [n for n in os.listdir(manager.root) if n.startswith(ckpt.LATEST)] == [ckpt.LATEST]
    restored, restored_opt = _model_and_optimizer(seed=9)
    assert ckpt.load_checkpoint(manager.latest(), restored, restored_opt)["step"] == 1
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in before.items())
    # The next save succeeds, replaces the leftovers and moves `latest`.
    ckpt.save_checkpoint(manager, 2, model, opt, {"step": 2})
    assert manager.latest() == manager.path(2)
    assert not [n for n in os.listdir(manager.root) if n.startswith(".tmp")]


def test_keep_last_n(tmp_path):
    model, opt = _model_and_optimizer()
    manager = ckpt.CheckpointManager(str(tmp_path), keep_last=2)
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(manager, step, model, opt, {"step": step})
    assert manager.steps() == [15, 20] and manager.latest() == manager.path(20)


def _launch(cfg: TrainConfig, run_file: str, resume: bool = False) -> subprocess.Popen:
    with open(run_file, "w") as f:
        f.write(to_toml(cfg))
    cmd = [sys.executable, "-m", "openjamba", "train", "--config", run_file] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(out_dir: str) -> dict[int, float]:
    """Loss per step; a step repeated after a resume keeps its last record."""
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if r["split"] == "train"}


def _steps_logged(out_dir: str) -> int:
    """Complete lines in metrics.jsonl: the last step finished (one train record per step, no validation)."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_is_bit_identical(data_dir, tmp_path):
    steps, interval = 30, 4
    overrides = dict(train={"max_steps": steps}, checkpoint={"interval": interval, "keep_last": 2},
                     eval={"interval": 0})
    ref_cfg = tiny_config(data_dir, str(tmp_path / "ref"), **overrides)
    ref = _launch(ref_cfg, str(tmp_path / "ref.toml"))
    rng = random.Random()
    for attempt in range(3):
        out = str(tmp_path / f"killed{attempt}")
        cfg = tiny_config(data_dir, out, **overrides)
        proc = _launch(cfg, str(tmp_path / f"killed{attempt}.toml"))
        latest = os.path.join(out, "checkpoints", "latest")
        kill_after = rng.randint(interval + 1, steps - 8)  # a random step after the first checkpoint
        while proc.poll() is None and not (os.path.exists(latest) and _steps_logged(out) >= kill_after):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))  # and a random moment within a step (or a checkpoint write)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode == -signal.SIGKILL and max(_losses(out)) < steps:
            break
    else:
        pytest.fail(f"the training process was not killed mid-run (exit code {proc.returncode}): {err[-2000:]}")
    with open(latest) as f:
        resumed_at = int(f.read().strip().split("_")[1])
    resumed = _launch(cfg, str(tmp_path / "resume.toml"), resume=True)
    r_out, r_err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, r_err
    assert "resumed from" in r_err and f"at step {resumed_at}" in r_err
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err
    want, got = _losses(str(tmp_path / "ref")), _losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    after = [s for s in range(resumed_at + 1, steps + 1)]
    assert after and [got[s] for s in after] == [want[s] for s in after]  # bit-identical floats
    final_ref = load_file(os.path.join(tmp_path, "ref", "checkpoints", f"step_{steps:08d}", "model.safetensors"))
    final = load_file(os.path.join(out, "checkpoints", f"step_{steps:08d}", "model.safetensors"))
    assert final.keys() == final_ref.keys() and all(torch.equal(final[k], final_ref[k]) for k in final)
