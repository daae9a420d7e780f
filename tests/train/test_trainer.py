"""The training loop: loss falls, metrics are written, NaN stops or skips, in-process resume is exact."""

from __future__ import annotations

import os

import pytest
import torch

from openjamba.config import JambaConfig
from openjamba.model import JambaForCausalLM
from openjamba.train.trainer import NonFiniteLossError, train

from train_helpers import read_jsonl, tiny_config


def _nan_model(bad_calls: set[int]) -> JambaForCausalLM:
    """jamba-tiny whose lm_head outputs NaN on the given (1-based) training forward calls."""
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny", vocab_size=300))
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return output * float("nan")
        return output

    model.lm_head.register_forward_hook(hook)
    return model


def test_training_lowers_the_loss_and_logs_metrics(data_dir, tmp_path):
    cfg = tiny_config(data_dir, str(tmp_path / "run"), train={"max_steps": 30, "activation_loss_coef": 1e-5},
                      data={"grad_accum": 2}, eval={"interval": 10}, checkpoint={"interval": 10, "keep_last": 2})
    summary = train(cfg)
    assert summary["steps"] == 30 and summary["stop_reason"] == "max_steps"
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    records = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    train_recs = [r for r in records if r["split"] == "train"]
    val_recs = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train_recs] == list(range(1, 31))
    assert [r["step"] for r in val_recs] == [10, 20, 30]
    assert val_recs[-1]["loss"] < val_recs[0]["loss"]
    r = train_recs[-1]
    assert r["tokens"] == 30 * 2 * 4 * 32 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    # jamba-tiny has 4 experts top-2: every expert's share of assignments is in (0, 1/2].
    assert 0 <= r["expert_load_min"] <= 0.25 <= r["expert_load_max"] <= 0.5
    assert r["max_activation"] > 0
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["latest", "step_00000020", "step_00000030"]  # keep_last=2
    assert os.path.exists(tmp_path / "run" / "train_config.toml")


def test_nan_loss_stops_with_a_clear_message(data_dir, tmp_path):
    cfg = tiny_config(data_dir, str(tmp_path / "run"), checkpoint={"interval": 2})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4.*stopping.*nan_policy"):
        train(cfg, model=_nan_model({4}))
    # The last checkpoint (step 2) is intact and the run did not go on.
    with open(tmp_path / "run" / "checkpoints" / "latest") as f:
        assert f.read().strip() == "step_00000002"
    steps = [r["step"] for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"]
    assert max(steps) == 3


def test_nan_loss_skip_policy_skips_the_update(data_dir, tmp_path, capsys):
    cfg = tiny_config(data_dir, str(tmp_path / "run"), train={"nan_policy": "skip"})
    summary = train(cfg, model=_nan_model({3, 6}))
    assert summary["steps"] == 8 and summary["skipped"] == 2
    assert "update skipped" in capsys.readouterr().err
    last = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"][-1]
    assert last["skipped"] == 2 and last["loss"] == last["loss"]  # finite again
    # Too many in a row: stop even under "skip".
    cfg = tiny_config(data_dir, str(tmp_path / "run2"), train={"nan_policy": "skip", "nan_max_skips": 2})
    with pytest.raises(NonFiniteLossError):
        train(cfg, model=_nan_model({2, 3, 4}))


def test_resume_in_process_matches_an_uninterrupted_run(data_dir, tmp_path):
    full = tiny_config(data_dir, str(tmp_path / "full"), train={"max_steps": 10})
    train(full)
    first = tiny_config(data_dir, str(tmp_path / "part"), train={"max_steps": 10, "max_seconds": 1e-9})
    assert train(first)["steps"] == 1  # stopped by the time limit, with a checkpoint
    again = tiny_config(data_dir, str(tmp_path / "part"), train={"max_steps": 10})
    assert train(again, resume=True)["steps"] == 10
    want = {r["step"]: r["loss"] for r in read_jsonl(str(tmp_path / "full" / "metrics.jsonl")) if r["split"] == "train"}
    got = {r["step"]: r["loss"] for r in read_jsonl(str(tmp_path / "part" / "metrics.jsonl")) if r["split"] == "train"}
    assert got == want


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_training_on_gpu(data_dir, tmp_path, precision):
    cfg = tiny_config(data_dir, str(tmp_path / "run"), train={"max_steps": 6, "device": "cuda", "precision": precision,
                                                               "export": True, "sample_tokens": 8})
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    last = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"][-1]
    assert last["mfu"] > 0 and last["peak_mem_gb"] > 0
    assert summary["sample"] and os.path.exists(os.path.join(summary["hf_dir"], "model.safetensors"))
