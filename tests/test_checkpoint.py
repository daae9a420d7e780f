"""Checkpoint I/O: round trips, both MoE layouts, sharding, dtypes, tokenizer, atomic writes, every error."""

import json
import os
import pickle

import pytest
import safetensors.torch
import torch
from hf_utils import BASE, max_diff, randomize_
from safetensors.torch import load_file, save_file

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.checkpoint import CheckpointError, load_pretrained, parse_size, save_pretrained

EXPERT = "model.layers.1.feed_forward.experts"


def make_model(**overrides):
    torch.manual_seed(0)
    return randomize_(JambaForCausalLM(JambaConfig(**dict(BASE, **overrides))), seed=1)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return path


def ids(batch=2, length=9, seed=0):
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def rewrite(path, edit):
    """Load model.safetensors, let `edit` change the dict, write it back."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return str(file)


# ------------------------------------------------------------------------------------ round trips
def test_round_trip_single_file(model, saved):
    assert sorted(os.listdir(saved)) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = JambaForCausalLM.from_pretrained(saved)
    assert_same_weights(model, loaded)
    assert loaded.config == model.config and loaded.dtype == torch.float32
    assert max_diff(loaded(ids()).logits, model(ids()).logits) == 0
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["model_type"] == "jamba"
    gen = json.loads((saved / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)


def test_disk_layout_is_per_expert_gate_rows_first(model, saved):
    tensors = load_file(saved / "model.safetensors")
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in tensors)
    F = BASE["intermediate_size"]
    gate_up = model.model.layers[1].feed_forward.experts.gate_up_proj
    down = model.model.layers[1].feed_forward.experts.down_proj
    for j in range(BASE["num_experts"]):
        assert torch.equal(tensors[f"{EXPERT}.{j}.gate_proj.weight"], gate_up[j, :F])
        assert torch.equal(tensors[f"{EXPERT}.{j}.up_proj.weight"], gate_up[j, F:])
        assert torch.equal(tensors[f"{EXPERT}.{j}.down_proj.weight"], down[j])
    assert "lm_head.weight" in tensors  # untied


def test_fused_layout_loads(model, tmp_path):
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(tmp_path / "model.safetensors"))
    assert_same_weights(model, load_pretrained(tmp_path))


@pytest.mark.parametrize("limit", [3000, "20KB", "0.02MB"])
def test_sharded_round_trip(model, tmp_path, limit):
    save_pretrained(model, tmp_path, max_shard_size=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total, n_tensors = 0, 0
    for name in shards:
        tensors = load_file(tmp_path / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= parse_size(limit) or len(tensors) == 1  # a tensor bigger than the limit goes alone
        assert {k for k, v in index["weight_map"].items() if v == name} == set(tensors)
        total, n_tensors = total + size, n_tensors + len(tensors)
    assert index["metadata"]["total_size"] == total and n_tensors == len(index["weight_map"])
    assert_same_weights(model, load_pretrained(tmp_path))


def test_parse_size():
    assert parse_size(123) == 123 and parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("10kb") == 10**4
    for bad in ("lots", "5XB", 0, -1, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_tied_embeddings_not_written_and_retied(tmp_path):
    model = make_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert max_diff(loaded(ids()).logits, model(ids()).logits) == 0
    # A tied checkpoint that also stores the head is fine when it is the embedding ...
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert_same_weights(model, load_pretrained(tmp_path))
    # ... and an error when it is not (tying would silently drop it).
    file = rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs") as e:
        load_pretrained(tmp_path)
    assert file in str(e.value)


def test_save_refuses_to_drop_an_untied_head(tmp_path):
    model = make_model(tie_word_embeddings=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)
    with pytest.raises(CheckpointError, match="lm_head.weight is not the embedding"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dtypes(model, tmp_path):
    bf16 = load_pretrained(_save(model, tmp_path / "a"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())  # A_log and D included
    bf16.save_pretrained(tmp_path / "b")
    assert load_file(tmp_path / "b" / "model.safetensors")["model.layers.0.mamba.A_log"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    kept = load_pretrained(tmp_path / "b")  # dtype=None keeps the checkpoint's dtype
    assert kept.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in kept.parameters())
    assert_same_weights(bf16, kept)
    up = load_pretrained(tmp_path / "b", dtype="float32", device="cpu")
    assert up.dtype == torch.float32 and torch.equal(up.lm_head.weight, kept.lm_head.weight.float())
    assert load_pretrained(tmp_path / "b", dtype="fp16").dtype == torch.float16
    for bad in ("int8", torch.int32, "float7"):
        with pytest.raises(ValueError, match="dtype"):
            load_pretrained(tmp_path / "b", dtype=bad)


def _save(model, path):
    model.save_pretrained(path)
    return path


def test_overwrite_replaces_stale_shards_and_keeps_other_files(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size=5000)
    (tmp_path / "README.md").write_text("keep me")
    other = make_model(num_experts=2, num_experts_per_tok=1)
    save_pretrained(other, tmp_path)  # single file now
    names = set(os.listdir(tmp_path))
    assert names == {"README.md", "config.json", "generation_config.json", "model.safetensors"}
    assert_same_weights(other, load_pretrained(tmp_path))
    assert not [n for n in os.listdir(tmp_path.parent) if ".tmp-" in n]


def test_crash_mid_write_leaves_previous_checkpoint_intact(model, tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_pretrained(model, path, max_shard_size=5000)
    before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    real, calls = safetensors.torch.save_file, []

    def failing(tensors, filename, metadata=None):
        if calls:
            raise OSError("disk full")
        calls.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    other = make_model(num_experts=2, num_experts_per_tok=1)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(other, path, max_shard_size=5000)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(other, tmp_path / "fresh", max_shard_size=5000)
    assert calls  # the first shard was written before the failure
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging directories left behind
    monkeypatch.undo()
    assert_same_weights(model, load_pretrained(path))


def test_model_is_built_on_meta_and_materialised_once(saved, monkeypatch):
    """Loading must not initialise real weights first (that would double the memory of big models)."""
    devices = []
    real_init = JambaForCausalLM.reset_parameters

    def spy(self):
        devices.append(self.lm_head.weight.device.type)
        real_init(self)

    monkeypatch.setattr(JambaForCausalLM, "reset_parameters", spy)
    loaded = load_pretrained(saved, device=torch.device("cpu"))
    assert devices == ["meta"]
    assert all(p.device.type == "cpu" for p in loaded.parameters())


@pytest.mark.gpu
def test_load_onto_cuda_in_bf16(model, saved):
    loaded = load_pretrained(saved, dtype=torch.bfloat16, device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k].cpu(), v.to(torch.bfloat16)), k
    x = ids()
    logits = loaded(x.cuda()).logits.float().cpu()
    assert max_diff(logits, model(x).logits) < 0.25 * model(x).logits.abs().max().item()
    loaded.save_pretrained(saved / "from_gpu", max_shard_size=5000)
    assert_same_weights(loaded.cpu(), load_pretrained(saved / "from_gpu"))


def test_never_pickles(model, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used")

    for mod, name in ((torch, "load"), (torch, "save"), (pickle, "load"), (pickle, "loads"), (pickle, "dump")):
        monkeypatch.setattr(mod, name, refuse)
    save_pretrained(model, tmp_path, max_shard_size=5000)
    load_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ tokenizer
def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    return tok


def test_tokenizer_round_trip(tmp_path):
    model = make_model()
    assert model.tokenizer is None
    model.tokenizer = make_tokenizer()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>"}
    loaded = load_pretrained(tmp_path)
    assert loaded.tokenizer.encode("hello world").ids == model.tokenizer.encode("hello world").ids
    # Settings of a loaded tokenizer_config.json (e.g. a chat template) are written back.
    cfg["chat_template"] = "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    load_pretrained(tmp_path).save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("hello world").input_ids == model.tokenizer.encode("hello world").ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)


def test_no_tokenizer_file_means_none(saved):
    assert load_pretrained(saved).tokenizer is None


# ------------------------------------------------------------------------------------ errors
def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    for fragment in fragments:
        assert str(fragment) in str(e.value), (fragment, str(e.value))
    return e.value


def test_error_missing_directory_config_and_weights(saved, tmp_path):
    expect_error(tmp_path / "nowhere", "nowhere", "does not exist")
    expect_error(saved / "config.json", "config.json", "is not a directory")
    (saved / "config.json").rename(tmp_path / "config.json")
    expect_error(saved, str(saved), "no config.json")
    (tmp_path / "config.json").rename(saved / "config.json")
    (saved / "model.safetensors").unlink()
    expect_error(saved, str(saved), "no weights")


def test_error_bad_config(saved):
    path = saved / "config.json"
    text = path.read_text()
    path.write_text(text[:-20])
    expect_error(saved, str(path), "not valid JSON")
    cfg = json.loads(text)
    path.write_text(json.dumps(dict(cfg, attn_layer_offset=9)))
    expect_error(saved, str(path), "attn_layer_offset")


def test_error_index(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size=5000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text("{ not json")
    expect_error(tmp_path, str(index_path), "not valid JSON")
    index_path.write_text(json.dumps({"metadata": {}}))
    expect_error(tmp_path, str(index_path), "weight_map")
    key = "model.layers.0.mamba.A_log"

    def point(shard):
        index_path.write_text(json.dumps({"weight_map": dict(index["weight_map"], **{key: shard})}))

    point("model-00099-of-00099.safetensors")
    expect_error(tmp_path, str(index_path), key, "model-00099-of-00099.safetensors", "does not exist")
    point("../evil.safetensors")
    expect_error(tmp_path, str(index_path), key, "invalid shard name")
    # The index and the shards disagree: a tensor moved to the wrong shard.
    point(next(v for v in index["weight_map"].values() if v != index["weight_map"][key]))
    other = json.loads(index_path.read_text())["weight_map"][key]
    expect_error(tmp_path, str(tmp_path / other), key, "not in this shard")


F, H = BASE["intermediate_size"], BASE["hidden_size"]
MAMBA0 = "model.layers.0.mamba"
# (tensor, what to store under that name (None: remove it), words the error must contain)
TENSOR_CASES = {
    "missing": (f"{MAMBA0}.dt_proj.bias", None, "missing tensor"),
    "unexpected": (f"{MAMBA0}.extra.weight", lambda t: torch.zeros(2), "unexpected tensor"),
    "shape": (f"{MAMBA0}.A_log", lambda t: t[f"{MAMBA0}.A_log"].T.contiguous(), "[8, 64]"),
    "int_dtype": (f"{MAMBA0}.D", lambda t: torch.ones(64, dtype=torch.int32), "dtype I32"),
    "fp8_dtype": ("model.final_layernorm.weight", lambda t: torch.ones(H).to(torch.float8_e4m3fn), "dtype F8_E4M3"),
    "expert_range": (f"{EXPERT}.4.up_proj.weight", lambda t: torch.zeros(F, H), "expert index 4 is out of range"),
    "expert_incomplete": (f"{EXPERT}.2.up_proj.weight", None, "missing tensor"),
    "both_layouts": (f"{EXPERT}.gate_up_proj", lambda t: torch.zeros(4, 2 * F, H), "stored twice"),
    "expert_on_dense_layer": ("model.layers.0.feed_forward.experts.0.gate_proj.weight", lambda t: torch.zeros(F, H),
                              "no mixture of experts"),
    "untied_head": ("lm_head.weight", None, "missing tensor"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_error_tensor_mismatch(saved, case):
    name, value, message = TENSOR_CASES[case]

    def edit(tensors):
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value(tensors)

    expect_error(saved, rewrite(saved, edit), name, message)


def test_error_missing_tensor_in_sharded_checkpoint_names_the_index(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size=5000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.3.pre_ff_layernorm.weight"
    shard = tmp_path / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    index_path.write_text(json.dumps(index))
    expect_error(tmp_path, str(index_path), key, "missing tensor")


@pytest.mark.parametrize("cut", ["header", "data", "garbage", "empty"])
def test_error_truncated_or_corrupt_file(saved, cut):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    new = {"header": data[:30], "data": data[:-100], "garbage": b"\x07" * 8 + data[8:], "empty": b""}[cut]
    file.write_bytes(new)
    expect_error(saved, str(file), "not a readable safetensors file")


def test_error_corrupt_shard_in_sharded_checkpoint(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size=5000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / sorted(set(index["weight_map"].values()))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    expect_error(tmp_path, str(shard))


def test_error_bad_tokenizer(saved):
    (saved / "tokenizer.json").write_text("{ broken")
    expect_error(saved, str(saved / "tokenizer.json"), "tokenizer")
