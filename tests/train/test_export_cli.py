"""The training CLI verbs end to end, and the exported HF directory loading in transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from openjamba.cli import main
from openjamba.model import JambaForCausalLM
from openjamba.train.config import to_toml
from openjamba.train.data import read_index
from train_helpers import read_jsonl, tiny_config


def test_cli_tokenizer_data_train_export(corpus, tmp_path, capsys):
    tok = str(tmp_path / "tok" / "tokenizer.json")
    assert main(["tokenizer", "train", corpus, "--vocab-size", "280", "--out", tok]) == 0
    data = str(tmp_path / "data")
    assert main(["data", "prepare", corpus, "--tokenizer", tok, "--out", data, "--val-fraction", "0.1",
                 "--workers", "2"]) == 0
    index = read_index(data)
    assert index["vocab_size"] == 280 and index["splits"]["val"]["docs"] == 6
    assert "train: 54 documents" in capsys.readouterr().out
    cfg = tiny_config(data, str(tmp_path / "run"), train={"max_steps": 4, "export": True, "sample_tokens": 4})
    cfg.model.overrides = {}
    run_file = tmp_path / "run.toml"
    run_file.write_text(to_toml(cfg))
    assert main(["train", "--config", str(run_file), "--set", "optim.lr=0.002", "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "done: 3 steps" in out and "sample:" in out
    hf = tmp_path / "run" / "hf"
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 280  # taken from the tokenizer
    assert (hf / "tokenizer.json").exists()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    a = JambaForCausalLM.from_pretrained(str(hf))
    b = JambaForCausalLM.from_pretrained(str(tmp_path / "exported"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # Bad arguments are one-line errors with exit code 2.
    assert main(["train", "--config", str(run_file), "--set", "optim.nope=1"]) == 2
    assert main(["data", "prepare", corpus, "--tokenizer", "missing.json", "--out", data]) == 2
    assert "unknown key optim.nope" in capsys.readouterr().err


def test_exported_checkpoint_loads_in_transformers(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(data_dir, str(tmp_path / "run"), train={"max_steps": 6, "export": True, "sample_tokens": 0})
    summary = train_and_get(cfg)
    hf = summary["hf_dir"]
    ours = JambaForCausalLM.from_pretrained(hf).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids).logits
        got = theirs(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    # The weights are the trained ones: the final training checkpoint holds the same tensors.
    from safetensors.torch import load_file

    final = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    assert torch.equal(final["model.embed_tokens.weight"], ours.model.embed_tokens.weight)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf, "tokenizer.json"))
    text = "def value(self):\n    return data"
    assert tok.decode(tok(text)["input_ids"]) == text


def train_and_get(cfg):
    from openjamba.train.trainer import train

    summary = train(cfg)
    records = read_jsonl(os.path.join(cfg.train.out_dir, "metrics.jsonl"))
    assert records and "hf_dir" in summary
    return summary
