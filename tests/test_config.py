import json

import pytest
import torch

from openjamba import ConfigError, JambaConfig, JambaForCausalLM, PRESETS


def test_v01_layer_schedule_and_counts():
    c = JambaConfig.from_name("jamba-v0.1")
    assert c.attention_layer_ids == [4, 12, 20, 28]
    assert [i for i in range(32) if c.is_moe(i)] == list(range(1, 32, 2))
    assert c.mamba_dt_rank == 256
    p = c.param_counts()
    assert round(p["total"] / 1e9, 1) == 51.6
    assert round(p["active"] / 1e9, 1) == 12.1
    assert c.kv_cache_bytes(262144) == 4 * 2**30


def test_large_and_anchor_presets():
    p = JambaConfig.from_name("jamba-1.5-large").param_counts()
    assert round(p["total"] / 1e9) == 399 and round(p["active"] / 1e9) == 94
    assert JambaConfig.from_name("jamba-1.5-large").kv_cache_bytes(262144) == 9 * 2**30
    p = JambaConfig.from_name("jamba-1b").param_counts()
    assert round(p["total"] / 1e6) == 789 and round(p["active"] / 1e6) == 373


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_counts_match_instantiated_model(name):
    cfg = JambaConfig.from_name(name)
    with torch.device("meta"):  # the biggest presets must instantiate without memory
        model = JambaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.param_counts()["total"]


@pytest.mark.parametrize("override, field", [
    (dict(attn_layer_offset=8), "attn_layer_offset"),
    (dict(expert_layer_offset=2), "expert_layer_offset"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
    (dict(mamba_d_state=2.5), "mamba_d_state"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(pad_token_id=70000), "pad_token_id"),
])
def test_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        JambaConfig.from_name("jamba-v0.1", **override)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'jamba-7b'"):
        JambaConfig.from_name("jamba-7b")


def test_save_load_roundtrip_keeps_unknown_fields(tmp_path):
    c = JambaConfig.from_name("jamba-tiny")
    d = c.to_dict()
    d.update(sliding_window=None, use_mamba_kernels=False, num_logits_to_keep=1)
    (tmp_path / "config.json").write_text(json.dumps(d))
    c2 = JambaConfig.from_pretrained(tmp_path)
    assert c2 == c
    assert c2.extra["use_mamba_kernels"] is False
    c2.save_pretrained(tmp_path / "out")
    d2 = json.loads((tmp_path / "out" / "config.json").read_text())
    assert d2["use_mamba_kernels"] is False and d2["model_type"] == "jamba"
    assert d2["architectures"] == ["JambaForCausalLM"]


def test_dt_rank_auto_and_num_local_experts_alias():
    c = JambaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "mamba_dt_rank": "auto", "num_local_experts": 4, "num_experts_per_tok": 2})
    assert c.mamba_dt_rank == 4 and c.num_experts == 4


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        JambaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        JambaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "big"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        JambaConfig.from_pretrained(tmp_path)
