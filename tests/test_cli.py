"""`openjamba` verbs run in-process through `main([...])`, plus one real subprocess run."""

import os
import subprocess
import sys

import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.cli import main
from openjamba.memory import compare_rows, format_bytes, format_count, parse_tokens


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def row(out, name):
    """The line of a printed table that starts with `name`."""
    return next(line for line in out.splitlines() if line.split() and line.split()[0] == name)


def test_params_jamba_v01(capsys):
    code, out, _ = run(capsys, "params", "--preset", "jamba-v0.1")
    assert code == 0
    assert out.splitlines()[0] == "jamba-v0.1: 51.6B total parameters, 12.1B active per token"
    assert "45.1B" in row(out, "experts") and "16 experts" in row(out, "experts")
    assert "layers: 32 (4 attention, 28 Mamba; 16 MoE)" in out
    assert out.count("Md Me Md Me Ad Me Md Me") == 4  # attention at 4, 12, 20, 28; MoE on odd layers


def test_params_from_model_dir_reads_config(tmp_path, capsys):
    JambaConfig.from_name("jamba-10m").save_pretrained(tmp_path)
    code, out, _ = run(capsys, "params", "--model", str(tmp_path))
    assert code == 0 and "13.2M total parameters, 10.1M active" in out


def test_presets_lists_every_preset_with_counts(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    assert "51.6B" in row(out, "jamba-v0.1") and "12.1B" in row(out, "jamba-v0.1")
    assert "398.6B" in row(out, "jamba-1.5-large") and "94.1B" in row(out, "jamba-1.5-large")
    assert "jamba-tiny" in out


def test_memory_reproduces_the_paper_kv_table(capsys):
    code, out, _ = run(capsys, "memory", "--preset", "jamba-v0.1", "--context", "262144", "--compare")
    assert code == 0
    assert "4.0 GiB" in row(out, "KV")
    assert "128.0 GiB" in row(out, "Llama-2-7B")
    assert "32.0 GiB" in row(out, "Mistral-7B") and "32.0 GiB" in row(out, "Mixtral-8x7B")
    assert "80.0 GiB" in row(out, "Llama-2-70B")
    assert row(out, "jamba-v0.1").split()[-2:] == ["4.0", "GiB"]
    # The Mamba state is tiny and does not grow with context.
    mamba_at = lambda ctx: row(run(capsys, "memory", "--preset", "jamba-v0.1", "--context", ctx)[1], "Mamba")
    assert mamba_at("1024") == mamba_at("1M")
    assert "15.3 MiB" in mamba_at("256K")


def test_memory_scales_with_batch_dtype_and_large_preset(capsys):
    _, out, _ = run(capsys, "memory", "--preset", "jamba-v0.1", "--context", "256K", "--batch", "2", "--dtype", "fp32")
    assert "16.0 GiB" in row(out, "KV")  # 4 GiB x 2 (batch) x 2 (fp32)
    _, out, _ = run(capsys, "memory", "--preset", "jamba-1.5-large", "--context", "256K")
    assert "9.0 GiB" in row(out, "KV")  # the Jamba-1.5 paper's 9 GB for Large


def test_memory_budget_plans_serving(capsys):
    """--budget adds the serving plan (weights, cache, the prefill chunk that fits, workspaces) against a
    size, exit code 1 where it does not fit."""
    code, out, _ = run(capsys, "memory", "--preset", "jamba-1b", "--context", "128K", "--batch", "256",
                       "--budget", "139G")
    assert code == 0 and "serving plan against 139.0 GiB: fits" in out
    assert "(chunk 2048)" in out and "prefill in chunks of 2048 tokens per row" in out
    code, out, _ = run(capsys, "memory", "--preset", "jamba-v0.1", "--context", "256K", "--budget", "80GiB")
    assert code == 1 and "serving plan against 80.0 GiB: does not fit" in out and "weights 96.06 GiB" in out
    code, out, _ = run(capsys, "memory", "--preset", "jamba-v0.1", "--context", "256K", "--budget", "80G",
                       "--compare")
    assert code == 1 and "does not fit" in out and "Llama-2" in out  # the table too, and still exit code 1
    code, out, _ = run(capsys, "memory", "--preset", "jamba-v0.1", "--context", "256K", "--budget", "0.5T")
    assert code == 0 and "against 512.0 GiB: fits" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_memory_budget_cuda_needs_cuda(capsys):
    code, out, err = run(capsys, "memory", "--preset", "jamba-1b", "--context", "1K", "--budget", "cuda")
    assert code == 2 and out == "" and "--budget cuda needs a CUDA device" in err


def test_memory_helpers():
    assert parse_tokens("262144") == parse_tokens("256K") == parse_tokens("256k") == 262144
    assert parse_tokens("1M") == 1 << 20
    for bad in ("0", "-5", "abc", "1.5K", ""):
        with pytest.raises(ValueError):
            parse_tokens(bad)
    assert format_bytes(4 * 2 ** 30) == "4.0 GiB" and format_bytes(512) == "512 B"
    assert format_count(51_570_323_328) == "51.6B" and format_count(65_432) == "65.4K"
    rows = {r["name"]: r for r in compare_rows(JambaConfig.from_name("jamba-v0.1"), "jamba", 262144)}
    assert rows["Llama-2-7B"]["kv_cache"] == 128 * 2 ** 30 and rows["jamba"]["kv_cache"] == 4 * 2 ** 30


@pytest.mark.parametrize("argv, message", [
    (["params", "--preset", "jamba-9000"], "unknown preset 'jamba-9000'"),
    (["params"], "one of the arguments --preset --model is required"),
    (["params", "--preset", "jamba-v0.1", "--model", "x"], "not allowed with"),
    (["params", "--model", "/no/such/dir"], "does not exist"),
    (["memory", "--preset", "jamba-v0.1"], "--context"),
    (["memory", "--preset", "jamba-v0.1", "--context", "lots"], "positive token count"),
    (["memory", "--preset", "jamba-v0.1", "--context", "-1"], "--context"),
    (["memory", "--preset", "jamba-v0.1", "--context", "8", "--batch", "0"], "positive integer"),
    (["memory", "--preset", "jamba-v0.1", "--context", "8", "--dtype", "int4"], "invalid choice"),
    (["memory", "--preset", "jamba-v0.1", "--context", "8", "--budget", "lots"], "memory size such as 80G"),
    (["memory", "--preset", "jamba-v0.1", "--context", "8", "--budget", "0G"], "memory size such as 80G"),
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "does not exist"),
    (["generate", "--model", "/tmp", "--prompt-ids", "1,x"], "token ids"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error:" in err and message in err
    assert "Traceback" not in err


def test_generate_without_tokenizer_needs_prompt_ids(tmp_path, capsys):
    JambaConfig.from_name("jamba-tiny").save_pretrained(tmp_path)
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt", "hello")
    assert code == 2 and "no tokenizer.json" in err and "--prompt-ids" in err


def test_training_verbs_are_registered(monkeypatch, capsys):
    import openjamba.train.cli as train_cli

    def add_commands(sub):
        sub.add_parser("fake-train").set_defaults(func=lambda args: print("training") or 0)

    monkeypatch.setattr(train_cli, "add_commands", add_commands)
    assert run(capsys, "fake-train")[:2] == (0, "training\n")


def test_python_dash_m_subprocess():
    proc = subprocess.run([sys.executable, "-m", "openjamba", "params", "--preset", "jamba-v0.1"],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert "51.6B total parameters, 12.1B active per token" in proc.stdout


# ---------------------------------------------------------------------------------------------- generate
def train_tokenizer():
    """A small byte-level BPE trained on a few strings (so any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    text = ["the hybrid model mixes attention and mamba layers", "mixture of experts routes each token",
            "a cache keeps keys and values", "the state space model scans the sequence"] * 4
    tok.train_from_iterator(text, trainer)
    return tok


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random model saved with its tokenizer: (dir, model, tokenizer)."""
    pytest.importorskip("openjamba.checkpoint", reason="needs JambaForCausalLM.save_pretrained")
    tok = train_tokenizer()
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_name("jamba-tiny", vocab_size=tok.get_vocab_size())).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked logits: greedy output is robust to rounding
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    return directory, model, tok


def test_generate_streams_text_from_a_saved_model(saved_model, capsys):
    directory, model, tok = saved_model
    prompt = "the hybrid model"
    code, out, err = run(capsys, "generate", "--model", str(directory), "--prompt", prompt, "--temperature", "0",
                         "--max-new-tokens", "12", "--ignore-eos", "--device", "cpu")
    assert code == 0, err
    ids = tok.encode(prompt).ids
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, temperature=0)[0].tolist()
    assert out == tok.decode(expected) + "\n"
    assert out.startswith(prompt) and len(out) > len(prompt) + 3
    assert "12 tokens" in err and "tokens/s" in err


def test_generate_sampling_is_seeded(saved_model, capsys):
    directory = str(saved_model[0])
    argv = ["generate", "--model", directory, "--prompt", "a cache", "--seed", "3", "--top-p", "0.9",
            "--max-new-tokens", "10", "--ignore-eos", "--dtype", "fp32"]
    first = run(capsys, *argv)
    assert first[0] == 0 and first[1] == run(capsys, *argv)[1]


def test_generate_with_prompt_ids_prints_ids_without_tokenizer(saved_model, tmp_path, capsys):
    _, model, _ = saved_model
    model.save_pretrained(tmp_path)  # no tokenizer.json here
    code, out, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt-ids", "5,6,7", "--temperature",
                         "0", "--max-new-tokens", "6", "--ignore-eos")
    assert code == 0, err
    expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, temperature=0)[0].tolist()
    assert [int(t) for t in out.split()] == expected


@pytest.mark.parametrize("extra, message", [
    (["--prompt-ids", "1,99999"], "vocabulary"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
])
def test_generate_bad_sampling_arguments_exit_2(saved_model, capsys, extra, message):
    code, out, err = run(capsys, "generate", "--model", str(saved_model[0]), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
