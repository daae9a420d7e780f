"""The deferred training step (fused AdamW on one GPU): the update is guarded on the device and the loss
read one step later; a non-finite step must change no weights and stop or be skipped as configured."""

from __future__ import annotations

import pytest
import torch

from openjamba.train.trainer import NonFiniteLossError, train

from train_helpers import read_jsonl, tiny_config
from test_trainer import _nan_model


@pytest.mark.gpu
@pytest.mark.parametrize("precision,grad_clip,rel", [("bf16", 1.0, 1e-3), ("fp32", 0.01, 1e-5)])
def test_deferred_matches_synchronous_steps(data_dir, tmp_path, precision, grad_clip, rel):
    """Same losses and gradient norms with the deferred step (on CUDA with torch's fused AdamW, and with
    ClippedAdamW, whose update applies the clipping) as with the host deciding first (fused AdamW off),
    deterministic kernels in all; grad_clip 0.01 clips every step."""
    runs = {}
    for fused in ("true", "triton", "false"):
        out = str(tmp_path / fused)
        cfg = tiny_config(data_dir, out, optim={"fused": fused, "grad_clip": grad_clip},
                          train={"device": "cuda", "precision": precision, "deterministic": True, "max_steps": 6})
        cfg.log.interval = 3  # the deferred step reads most losses one step late
        train(cfg)
        runs[fused] = [r for r in read_jsonl(out + "/metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in runs["true"]] == [r["step"] for r in runs["triton"]] == [3, 6]
    if grad_clip < 0.1:
        assert all(r["grad_norm"] > 2 * grad_clip for r in runs["false"])  # clipping was active
    for deferred in ("true", "triton"):
        for a, b in zip(runs["false"], runs[deferred]):
            assert b["loss"] == pytest.approx(a["loss"], rel=rel)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rel)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", ["true", "triton"])
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_deferred_step_guards_non_finite_updates(data_dir, tmp_path, policy, fused):
    """A NaN loss at step 3: the update is skipped on the device (weights unchanged by it), then the run
    stops (policy stop) or goes on (policy skip) with that step counted as skipped."""
    model = _nan_model({3}).to(torch.bfloat16)
    cfg = tiny_config(data_dir, str(tmp_path / policy), optim={"fused": fused},
                      train={"device": "cuda", "precision": "bf16", "max_steps": 5, "nan_policy": policy})
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
            train(cfg, model=model)
        return
    summary = train(cfg, model=model)
    records = [r for r in read_jsonl(str(tmp_path / policy / "metrics.jsonl")) if r["split"] == "train"]
    assert summary["steps"] == 5 and records[-1]["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
