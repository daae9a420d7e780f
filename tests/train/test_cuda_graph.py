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


@pytest.mark.gpu
def test_captured_update_follows_the_lr_and_skips_non_finite_steps():
    """ClippedAdamW's update captured in the graph: a replay at lr 0 leaves every weight bit for bit (the
    rate is read on the device at each replay, not frozen at the capture), one at lr > 0 moves them, and a
    replay whose loss is NaN changes no weight, moment or step count."""
    import torch

    from openjamba import JambaConfig, JambaForCausalLM
    from openjamba.train.config import TrainConfig
    from openjamba.train.distributed import DistInfo
    from openjamba.train.optim import ClippedAdamW, build_optimizer
    from openjamba.train.trainer import StepRunner, prepare_model

    config = JambaConfig.from_name("jamba-tiny", vocab_size=300)
    torch.manual_seed(0)
    cfg = TrainConfig()
    cfg.train.cuda_graph, cfg.train.precision = True, "bf16"
    dist = DistInfo(device=torch.device("cuda"))
    model = prepare_model(JambaForCausalLM(config), cfg, dist, "bf16")
    optimizer = build_optimizer(model, cfg.optim, dist.device)
    assert isinstance(optimizer, ClippedAdamW)
    runner = StepRunner(model, optimizer, config, cfg, "bf16", dist)
    batch = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0)).pin_memory()
    params = list(model.parameters())

    def step(lr):
        return runner.finish(runner.launch([batch], lr))

    def bits():
        return [p.detach().view(torch.int16).clone() for p in params]

    def states(key):
        return [optimizer.state[p][key].clone() for p in params]

    for _ in range(GRAPH_WARMUP_STEPS + 1):  # eager warm-up steps, then the capture and its first replay
        step(1e-3)
    assert runner.graphed.update_graph is not None
    before, counts = bits(), states("step")
    assert step(0.0)[2]
    assert all(torch.equal(a, b) for a, b in zip(bits(), before))
    assert all(torch.equal(a, b + 1) for a, b in zip(states("step"), counts))
    assert step(1e-3)[2]
    matrices = [not torch.equal(a, b) for a, b, p in zip(bits(), before, params) if p.ndim >= 2]
    assert sum(matrices) >= 0.75 * len(matrices)  # (a step of ~lr can stay under half a bf16 ulp)

    with torch.no_grad():  # NaN logits for token 0 at every position, whether or not the head is tied
        model.lm_head.weight.view(-1)[0] = float("nan")
    before, counts, moments = bits(), states("step"), states("exp_avg")
    loss, norm, applied = step(1e-3)
    assert not applied and loss != loss
    assert all(torch.equal(a, b) for a, b in zip(bits(), before))
    assert all(torch.equal(a, b) for a, b in zip(states("step"), counts))
    assert all(torch.equal(a, b) for a, b in zip(states("exp_avg"), moments))
