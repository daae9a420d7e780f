"""The training step replayed as a CUDA graph (train.cuda_graph) against the same run without it."""

from __future__ import annotations

import shutil

import pytest

from openjamba.train.trainer import GRAPH_WARMUP_STEPS, train

from train_helpers import read_jsonl, tiny_config


def test_cuda_graph_needs_cuda(data_dir, tmp_path):
    cfg = tiny_config(data_dir, str(tmp_path / "run"), train={"cuda_graph": True})
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        train(cfg)


@pytest.mark.gpu
def test_cuda_graph_refuses_fp32_experts(data_dir, tmp_path):
    cfg = tiny_config(data_dir, str(tmp_path / "run"), train={"device": "cuda", "cuda_graph": True,
                                                               "precision": "fp32"})
    with pytest.raises(ValueError, match="needs train.precision"):
        train(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_training_matches_eager(data_dir, tmp_path, compile):
    """Same losses, gradient norms and metrics step by step (bf16 weights, as the CUDA grouped GEMM
    needs; deterministic kernels in both runs), with
    gradient accumulation, validation and a checkpoint between replays; the run then resumes from that
    checkpoint with graphs again and matches too."""
    runs = {}
    for graph in (False, True):
        out = str(tmp_path / f"graph{int(graph)}")
        cfg = tiny_config(data_dir, out, data={"grad_accum": 2},
                          train={"device": "cuda", "precision": "bf16", "deterministic": True, "max_steps": 8,
                                 "cuda_graph": graph, "compile": compile})
        assert train(cfg)["steps"] == 8
        runs[graph] = [r for r in read_jsonl(out + "/metrics.jsonl") if r["split"] == "train"]
    assert len(runs[True]) == 8 > GRAPH_WARMUP_STEPS
    for a, b in zip(runs[False], runs[True]):
        for key in ("loss", "grad_norm", "max_activation", "expert_load_max", "expert_load_min"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)
    # resume the graphed run from its step-4 checkpoint: steps 5..8 again, with a fresh capture
    out = str(tmp_path / "graph1")
    cfg = tiny_config(data_dir, out, data={"grad_accum": 2},
                      train={"device": "cuda", "precision": "bf16", "deterministic": True, "max_steps": 8,
                             "cuda_graph": True, "compile": compile})
    shutil.rmtree(out + "/checkpoints/step_00000008")
    with open(out + "/checkpoints/latest", "w") as f:
        f.write("step_00000004\n")
    train(cfg, resume=True)
    again = [r for r in read_jsonl(out + "/metrics.jsonl") if r["split"] == "train"][8:]
    assert [r["step"] for r in again] == [5, 6, 7, 8]
    for a, b in zip(runs[False][4:], again):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5), a["step"]
