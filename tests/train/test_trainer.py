"""The training loop: loss falls, metrics are written, NaN stops or skips, in-process resume is exact."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from openjamba.config import JambaConfig
from openjamba.model import JambaForCausalLM
from openjamba.train import distributed
from openjamba.train.config import TrainConfig
from openjamba.train.distributed import DistInfo, parallelize
from openjamba.train.metrics import MetricsLogger, Probes, read_metrics
from openjamba.train.trainer import NonFiniteLossError, prepare_model, train

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


def test_probes_count_each_assignment_once_with_activation_checkpointing():
    """The backward's recompute of a checkpointed layer and eval-mode forwards are not counted."""
    torch.manual_seed(0)
    base = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))  # 2 MoE layers, 4 experts, top-2
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    for ac in (False, True):
        model = parallelize(copy.deepcopy(base), DistInfo(), activation_checkpointing=ac)
        probes = Probes(model)
        model(ids, labels=ids).loss.backward()
        counts = {i: c.clone() for i, c in probes.counts.items()}
        assert len(counts) == 2 and all(c.sum() == 2 * 16 * 2 for c in counts.values())  # tokens x top-k
        model.eval()
        with torch.no_grad():
            model(ids)  # a validation pass
        assert all(torch.equal(probes.counts[i], c) for i, c in counts.items())
        seen.append((counts, probes.read()))
        probes.remove()
    (plain, plain_read), (ckpt, ckpt_read) = seen
    assert plain.keys() == ckpt.keys() and all(torch.equal(plain[i], ckpt[i]) for i in plain)
    assert plain_read == ckpt_read and plain_read["max_activation"] > 0


def test_metrics_are_identical_with_activation_checkpointing(data_dir, tmp_path):
    metrics = []
    for ac in (False, True):
        out = tmp_path / f"ac_{ac}"
        train(tiny_config(data_dir, str(out), train={"max_steps": 4, "activation_checkpointing": ac},
                          eval={"interval": 2}, checkpoint={"interval": 0}))
        metrics.append([{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                        for r in read_jsonl(str(out / "metrics.jsonl"))])
    assert metrics[0] == metrics[1]
    last = [r for r in metrics[0] if r["split"] == "train"][-1]
    assert {"expert_load_max", "expert_load_min", "max_activation"} <= last.keys()


@pytest.mark.parametrize("precision, dtype", [("autocast", torch.bfloat16), ("bf16", torch.bfloat16),
                                              ("fp32", None)])
def test_fsdp_param_dtype_follows_precision(monkeypatch, precision, dtype):
    seen = {}

    def fake_parallelize(model, dist, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(distributed, "parallelize", fake_parallelize)
    cfg = TrainConfig()
    cfg.train.precision = precision
    prepare_model(JambaForCausalLM(JambaConfig.from_name("jamba-tiny")), cfg, DistInfo(world_size=2), precision)
    assert seen["fsdp"] and seen["param_dtype"] == dtype


def test_metrics_logger_without_tensorboard_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    logger = MetricsLogger(str(tmp_path), tensorboard=True)
    logger.log({"step": 1, "split": "train", "loss": 2.5})
    logger.close()
    assert "install openjamba[train]" in capsys.readouterr().err
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "split": "train", "loss": 2.5}]


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


def test_deterministic_mode_is_on_during_training_only(data_dir, tmp_path, monkeypatch):
    """train.deterministic switches torch's deterministic algorithms on (strict) for the run, with cuBLAS's
    workspace setting, and restores the previous settings afterwards (they are process-global)."""
    import openjamba.train.trainer as trainer_mod

    seen = []
    real = trainer_mod.forward_backward

    def spy(*a, **kw):
        seen.append(torch.are_deterministic_algorithms_enabled() and not
                    torch.is_deterministic_algorithms_warn_only_enabled()  # strict: no warn-only fallbacks
                    and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8")
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "forward_backward", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    train(tiny_config(data_dir, str(tmp_path / "det"), train={"max_steps": 2, "deterministic": True}))
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seen.clear()
    train(tiny_config(data_dir, str(tmp_path / "nondet"), train={"max_steps": 2}))
    assert seen and not any(seen)


def test_deterministic_run_names_an_operation_without_a_deterministic_implementation(data_dir, tmp_path):
    """Strict mode: a forward that uses an op torch cannot run deterministically (here put_) stops the run
    with an error that says train.deterministic is why and names the op."""
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny", vocab_size=300))
    model.lm_head.register_forward_hook(lambda m, i, out: out.clone().put_(torch.tensor([0]), out.new_zeros(1)))
    with pytest.raises(RuntimeError, match="train.deterministic is set, and an operation of this run has no "
                                           "deterministic implementation in torch: put_ does not have"):
        train(tiny_config(data_dir, str(tmp_path / "det"), train={"max_steps": 1, "deterministic": True}),
              model=model)
    assert not torch.are_deterministic_algorithms_enabled()


# Run in a fresh process: torch warns once per process about a non-deterministic algorithm, so an earlier
# test could hide the warning this looks for.
_TWO_DETERMINISTIC_RUNS = r"""
import sys, warnings
import torch
from safetensors.torch import load_file
from openjamba.train.trainer import train
from train_helpers import read_jsonl, tiny_config

data_dir, out = sys.argv[1], sys.argv[2]
runs = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name in ("a", "b"):
        cfg = tiny_config(data_dir, f"{out}/{name}", data={"seq_len": 256, "batch_size": 8},
                          train={"device": "cuda", "precision": "bf16", "deterministic": True, "max_steps": 4})
        train(cfg)
        records = [(r["loss"], r["grad_norm"]) for r in read_jsonl(f"{out}/{name}/metrics.jsonl")
                   if r["split"] == "train"]
        runs.append((records, load_file(f"{out}/{name}/checkpoints/step_00000004/model.safetensors")))
# torch's warn-only messages: "... defaults to a non-deterministic algorithm" (attention's backward) and
# "... does not have a deterministic implementation" (other ops)
warned = [str(w.message) for w in caught if "deterministic" in str(w.message).lower()]
assert not warned, warned
(losses_a, weights_a), (losses_b, weights_b) = runs
assert len(losses_a) == 4 and losses_a == losses_b, (losses_a, losses_b)
assert weights_a.keys() == weights_b.keys()
assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
print("identical")
"""


@pytest.mark.gpu
def test_deterministic_gpu_runs_are_bit_identical(data_dir, tmp_path):
    """Two train.deterministic runs on the GPU (attention, Mamba and MoE layers, bf16): the same losses and
    gradient norms and bit-identical weights, and no non-deterministic algorithm ran (torch would warn). At
    this size two runs also agree bit for bit in warn-only mode, where cuDNN attention's non-deterministic
    backward runs: the warning check is what fails then."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, "-c", _TWO_DETERMINISTIC_RUNS, data_dir, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stderr[-3000:]


def test_clipping_folded_into_the_optimizer_matches_clip_grad_norm(data_dir, tmp_path, monkeypatch):
    """optim.fused "triton" (ClippedAdamW: the step measures the norm, the update clips) against torch's
    AdamW after clip_grad_norm_, with grad_clip 0.01 clipping every step; then a run killed after one
    step and resumed with ClippedAdamW gives the uninterrupted run's losses."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets "triton" be chosen on a CPU (the ops run the reference)
    runs = {}
    for fused in ("false", "triton"):
        cfg = tiny_config(data_dir, str(tmp_path / fused), optim={"fused": fused, "grad_clip": 0.01},
                          train={"max_steps": 6})
        train(cfg)
        runs[fused] = [r for r in read_jsonl(str(tmp_path / fused / "metrics.jsonl")) if r["split"] == "train"]
    assert all(r["grad_norm"] > 2 * 0.01 for r in runs["false"])
    for a, b in zip(runs["false"], runs["triton"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    part = dict(optim={"fused": "triton", "grad_clip": 0.01})
    train(tiny_config(data_dir, str(tmp_path / "part"), train={"max_steps": 6, "max_seconds": 1e-9}, **part))
    train(tiny_config(data_dir, str(tmp_path / "part"), train={"max_steps": 6}, **part), resume=True)
    got = [r for r in read_jsonl(str(tmp_path / "part" / "metrics.jsonl")) if r["split"] == "train"]
    assert {r["step"]: r["loss"] for r in got} == {r["step"]: r["loss"] for r in runs["triton"]}
