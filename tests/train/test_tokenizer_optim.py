"""Tokenizer training/loading, AdamW parameter groups, the learning-rate schedule, run-file parsing."""

from __future__ import annotations

import math

import pytest

from openjamba.config import JambaConfig
from openjamba.model import JambaForCausalLM
from openjamba.train.config import TrainConfigError, load_config
from openjamba.ops import BackendUnavailable
from openjamba.train.optim import ClippedAdamW, build_optimizer, lr_at, optimizer_kind, param_groups
from openjamba.train.tokenizer import load_tokenizer, special_token_ids, train_tokenizer


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_trains_with_jamba_special_ids_and_round_trips(tokenizer_path, tmp_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.get_vocab_size() == 300
    cfg = JambaConfig.from_name("jamba-tiny")
    assert special_token_ids(tok) == {"pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
                                      "eos_token_id": cfg.eos_token_id}
    text = "def f(x):\n    return x  # naïve → 数据 \x00"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # byte-level: anything encodes, nothing is unknown
    assert len(ids) < len(text.encode())  # merges were learned
    # A directory holding tokenizer.json loads too.
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path)).encode(text).ids == ids


def test_tokenizer_rejects_a_vocab_below_the_byte_alphabet():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 100, show_progress=False)


# ---------------------------------------------------------------------------------------------- optimizer
def test_no_weight_decay_on_norms_biases_A_log_D_and_embeddings():
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = dict(model.named_parameters())
    assert set(decay["names"]) | set(no_decay["names"]) == set(names)
    assert not set(decay["names"]) & set(no_decay["names"])
    for name in no_decay["names"]:
        leaf = name.rsplit(".", 1)[-1]
        assert (names[name].ndim == 1 or leaf == "A_log" or "embed_tokens" in name or name == "lm_head.weight"), name
    for name in names:
        if name.endswith(("A_log", ".D", "norm.weight", ".bias")) or "embed_tokens" in name:
            assert name in no_decay["names"], name
    assert "model.layers.0.mamba.in_proj.weight" in decay["names"]
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in decay["names"]
    assert "model.layers.2.self_attn.q_proj.weight" in decay["names"]
    decay_e, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert "model.embed_tokens.weight" in decay_e["names"] and "lm_head.weight" in decay_e["names"]


def test_build_optimizer_groups_and_tied_weights():
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny", tie_word_embeddings=True))
    cfg = load_config(None, ["optim.weight_decay=0.05"]).optim
    opt = build_optimizer(model, cfg, model.device)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["fused"] is False  # fused AdamW is for CUDA


def test_warmup_cosine_schedule_values():
    lr, warm, total, ratio = 1e-3, 10, 110, 0.1
    assert lr_at(0, lr, warm, total, ratio) == pytest.approx(1e-4)
    assert lr_at(4, lr, warm, total, ratio) == pytest.approx(5e-4)
    assert lr_at(9, lr, warm, total, ratio) == pytest.approx(1e-3)
    assert lr_at(10, lr, warm, total, ratio) == pytest.approx(1e-3)
    assert lr_at(60, lr, warm, total, ratio) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint
    assert lr_at(35, lr, warm, total, ratio) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, lr, warm, total, ratio) == pytest.approx(1e-4)
    assert lr_at(500, lr, warm, total, ratio) == pytest.approx(1e-4)
    values = [lr_at(s, lr, warm, total, ratio) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warmup
    assert lr_at(0, lr, 0, total, ratio) == pytest.approx(lr)  # no warmup


# ---------------------------------------------------------------------------------------------- run files
def test_toml_run_file_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "jamba-tiny"\nhidden_size = 64\n[optim]\nlr = 1\n'
                    '[train]\nmax_steps = 7\nout_dir = "runs/x"\n')
    cfg = load_config(str(path), ["optim.warmup_steps=3", "train.nan_policy=skip", 'train.sample_prompt="x = "',
                                  "train.compile=true"])
    assert cfg.model.preset == "jamba-tiny" and cfg.model.overrides == {"hidden_size": 64}
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.warmup_steps == 3 and cfg.train.max_steps == 7 and cfg.train.nan_policy == "skip"
    assert cfg.train.sample_prompt == "x = " and cfg.train.compile is True
    for bad, match in [(["optim.lr_typo=1"], "unknown key"), (["nosection.x=1"], "unknown config section"),
                       (["train.max_steps=abc"], "must be a int"), (["train.nan_policy=ignore"], "nan_policy"),
                       (["optim.lr"], "section.key=value")]:
        with pytest.raises(TrainConfigError, match=match):
            load_config(str(path), bad)
    (tmp_path / "bad.toml").write_text("[optim\n")
    with pytest.raises(TrainConfigError, match="not valid TOML"):
        load_config(str(tmp_path / "bad.toml"))


def test_toml_without_a_parser_says_what_to_install(tmp_path, monkeypatch):
    from openjamba.train import config

    monkeypatch.setattr(config, "tomllib", None)  # Python 3.10 without tomli
    (tmp_path / "run.toml").write_text("[train]\nmax_steps = 3\n")
    with pytest.raises(TrainConfigError, match=r"run file on Python 3.10 needs tomli: install openjamba\[train\]"):
        load_config(str(tmp_path / "run.toml"))
    with pytest.raises(TrainConfigError, match=r"--set values on Python 3.10 needs tomli"):
        load_config(None, ["train.max_steps=3"])
    assert load_config(None).train.max_steps == 1000  # the defaults need no parser


def test_example_run_files_load_and_name_valid_models():
    import glob
    import os

    from openjamba.config import JambaConfig
    from openjamba.train.quickstart import quickstart_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = sorted(glob.glob(os.path.join(root, "configs", "*.toml")))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path)
        JambaConfig.from_name(cfg.model.preset, **cfg.model.overrides)
    # The quick start's run file says what the command trains.
    assert load_config(os.path.join(root, "configs", "quickstart.toml")).to_dict() == \
        quickstart_config("runs/quickstart").to_dict()


def test_build_optimizer_chooses_visibly(monkeypatch):
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny"))
    cfg = load_config(None, []).optim
    assert optimizer_kind(build_optimizer(model, cfg, model.device)) == "foreach"  # auto on a CPU
    cfg.fused = "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="optim.fused \"triton\""):
        build_optimizer(model, cfg, model.device)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt = build_optimizer(model, cfg, model.device)
    assert isinstance(opt, ClippedAdamW) and optimizer_kind(opt) == "triton"
    with pytest.raises(ValueError, match="with 2 processes"):
        build_optimizer(model, cfg, model.device, world_size=2)
    with pytest.raises(ValueError, match="optim.fused must be"):
        load_config(None, ["optim.fused=fast"]).validate()
