"""`openjamba train` under torchrun (2 CPU processes, gloo): FSDP2 + expert parallel follows the single run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from openjamba.train.config import to_toml
from openjamba.train.trainer import train
from train_helpers import read_jsonl, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_process_training_matches_one_process(data_dir, tmp_path):
    pytest.importorskip("torch.distributed.run")
    steps = {"max_steps": 6}
    two = tiny_config(data_dir, str(tmp_path / "two"), train={**steps, "expert_parallel": 2}, data={"batch_size": 2})
    (tmp_path / "two.toml").write_text(to_toml(two))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "openjamba", "train", "--config", str(tmp_path / "two.toml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 x cpu" in proc.stderr and proc.stdout.count("done: 6 steps") == 1  # the main rank reports
    # One process with the same global batch (2 ranks x 2 = 4 sequences, the same windows).
    one = tiny_config(data_dir, str(tmp_path / "one"), train=steps, data={"batch_size": 4})
    train(one)
    got = [r for r in read_jsonl(str(tmp_path / "two" / "metrics.jsonl")) if r["split"] == "train"]
    want = [r for r in read_jsonl(str(tmp_path / "one" / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) < 1e-4 and abs(g["grad_norm"] - w["grad_norm"]) < 1e-3 * w["grad_norm"]
    assert os.path.exists(tmp_path / "two" / "checkpoints" / "step_00000006" / "model.safetensors")
    # The 2-process checkpoint (full tensors) resumes in one process with the same global batch.
    more = tiny_config(data_dir, str(tmp_path / "two"), train={"max_steps": 8}, data={"batch_size": 4})
    summary = train(more, resume=True)
    assert summary["steps"] == 8 and summary["last_loss"] < want[0]["loss"]
