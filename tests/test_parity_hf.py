"""Parity with transformers' JambaForCausalLM through checkpoints, in both directions.

Each test builds a randomly initialised model with non-trivial weights (see hf_utils.randomize_), writes
it with one library's save_pretrained, reads it with the other's from_pretrained, and compares fp32
logits (and losses) on the same tokens.
"""

import json
import os

import pytest
import torch
from hf_utils import CONFIGS, max_diff, randomize_
from safetensors.torch import save_file

from openjamba import JambaConfig, JambaForCausalLM

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-4
B, T = 2, 11


def hf_model(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.JambaForCausalLM(transformers.JambaConfig(**CONFIGS[name]))
    return randomize_(model, seed=seed + 1).eval()


def our_model(name, seed=0):
    torch.manual_seed(seed)
    return randomize_(JambaForCausalLM(JambaConfig(**CONFIGS[name])), seed=seed + 1).eval()


def tokens(seed=0, batch=B, length=T):
    return torch.randint(3, CONFIGS["base"]["vocab_size"], (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def hf_from_pretrained(path):
    return transformers.JambaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------ transformers -> ours
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_transformers_checkpoint_loads_with_same_logits(name, sharded, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
    ours = JambaForCausalLM.from_pretrained(tmp_path)
    assert ours.config.tie_word_embeddings == CONFIGS[name]["tie_word_embeddings"]
    x = tokens()
    with torch.no_grad():
        diff = max_diff(ours(x).logits, hf(x).logits)
        assert diff <= TOL, diff
        # The tolerance means something: the logits are O(1) and differ between tokens.
        assert hf(x).logits.std() > 0.3


@pytest.mark.parametrize("name", ["base", "top1_offsets", "moe_everywhere"])
def test_loss_and_aux_loss_match(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = JambaForCausalLM.from_pretrained(tmp_path)
    x = tokens(1)
    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = hf(x, labels=labels, output_router_logits=True)
        out = ours(x, labels=labels)
    assert ref.aux_loss > 0.9  # top-k fractions sum to k, so a balanced router gives ~k
    assert max_diff(out.aux_loss, ref.aux_loss) <= 1e-5
    assert max_diff(out.loss, ref.loss) <= 1e-5


def test_dense_model_loss_matches(tmp_path):
    hf = hf_model("dense_tied")
    hf.save_pretrained(tmp_path)
    ours = JambaForCausalLM.from_pretrained(tmp_path)
    x = tokens(2)
    with torch.no_grad():
        ref, out = hf(x, labels=x), ours(x, labels=x)
    assert out.aux_loss is None
    assert max_diff(out.loss, ref.loss) <= 1e-5


def left_padded(seed=3):
    """Rows of length 11 and 7 (left padded with the pad id 0) and their mask."""
    x = tokens(seed)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    x[1, :4] = 0
    return x, mask


@pytest.mark.parametrize("name", ["base", "dense_tied"])
def test_left_padded_batch_matches(name, tmp_path):
    """transformers and ours agree on every real token of a left-padded batch (proj bias off: see below)."""
    assert not CONFIGS[name]["mamba_proj_bias"]
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = JambaForCausalLM.from_pretrained(tmp_path)
    x, mask = left_padded()
    labels = x.masked_fill(mask == 0, -100)
    # The first real token would be predicted from the last padding position, whose logits are
    # meaningless (and differ between the two implementations): leave it out of the loss.
    labels[1, 4] = -100
    with torch.no_grad():
        ref = hf(x, attention_mask=mask, labels=labels, output_router_logits=CONFIGS[name]["num_experts"] > 1)
        out = ours(x, attention_mask=mask, labels=labels)
        alone = ours(x[1:, 4:]).logits
    real = mask.bool()
    assert max_diff(out.logits[real], ref.logits[real]) <= TOL
    assert max_diff(out.loss, ref.loss) <= 1e-5
    if out.aux_loss is not None:
        assert max_diff(out.aux_loss, ref.aux_loss) <= 1e-5
    assert max_diff(out.logits[1, 4:], alone[0]) <= TOL  # padding does not change the short row


def test_left_padding_with_proj_bias_stays_row_independent(tmp_path):
    """With mamba_proj_bias, in_proj maps a zeroed padding position to its bias; transformers lets that
    bias into the conv state of the padded row, we zero it, so our padded row equals the row alone."""
    name = "top1_offsets"
    assert CONFIGS[name]["mamba_proj_bias"]
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = JambaForCausalLM.from_pretrained(tmp_path)
    x, mask = left_padded()
    with torch.no_grad():
        padded = ours(x, attention_mask=mask).logits
        alone = ours(x[1:, 4:]).logits
        full = hf(x[:1]).logits
    assert max_diff(padded[1, 4:], alone[0]) <= TOL
    assert max_diff(padded[0], full[0]) <= TOL  # the unpadded row still matches transformers


def test_fused_expert_layout_loads(tmp_path):
    """A file holding transformers' in-memory tensors (experts.gate_up_proj / down_proj) loads too."""
    hf = hf_model("base")
    hf.config.save_pretrained(tmp_path)
    state = fuse_experts({k: v.contiguous() for k, v in hf.state_dict().items()})
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = JambaForCausalLM.from_pretrained(tmp_path)
    x = tokens()
    with torch.no_grad():
        assert max_diff(ours(x).logits, hf(x).logits) <= TOL


def fuse_experts(state):
    """transformers v5 keeps experts fused in memory already; v4 keeps them per expert: fuse those."""
    prefixes = sorted({k.split(".0.gate_proj")[0] for k in state if k.endswith("experts.0.gate_proj.weight")})
    for p in prefixes:
        n = sum(1 for k in state if k.startswith(p + ".") and k.endswith("gate_proj.weight"))
        take = lambda kind: [state.pop(f"{p}.{j}.{kind}_proj.weight") for j in range(n)]  # noqa: E731
        state[f"{p}.gate_up_proj"] = torch.cat([torch.stack(take("gate")), torch.stack(take("up"))], dim=1)
        state[f"{p}.down_proj"] = torch.stack(take("down"))
    return state


# ------------------------------------------------------------------------------------ ours -> transformers
@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_checkpoint_loads_in_transformers(name, tmp_path):
    ours = our_model(name)
    ours.save_pretrained(tmp_path, max_shard_size="20KB" if name == "base" else None)
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == (name == "base")
    hf = hf_from_pretrained(tmp_path)
    assert hf.config.num_experts == CONFIGS[name]["num_experts"]
    x, mask = left_padded()
    with torch.no_grad():
        assert max_diff(hf(x[:1]).logits, ours(x[:1]).logits) <= TOL
        if not CONFIGS[name]["mamba_proj_bias"]:
            real = mask.bool()
            ref = hf(x, attention_mask=mask).logits[real]
            assert max_diff(ours(x, attention_mask=mask).logits[real], ref) <= TOL


def test_transformers_config_fields_survive_our_round_trip(tmp_path):
    hf_model("base").save_pretrained(tmp_path / "hf")
    JambaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).save_pretrained(tmp_path / "ours")
    before = json.loads((tmp_path / "hf" / "config.json").read_text())
    after = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("use_mamba_kernels", "use_mambapy", "attention_dropout", "output_router_logits", "use_cache"):
        assert after[key] == before[key], key
    assert before["dtype"] == "float32" and after["dtype"] == "bfloat16"  # describes the weights written
    assert hf_from_pretrained(tmp_path / "ours").config.num_experts == CONFIGS["base"]["num_experts"]


def test_bf16_checkpoint_loads_in_transformers_as_bf16(tmp_path):
    ours = our_model("base").to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path)  # dtype from config.json
    assert hf.dtype == torch.bfloat16
    sd = hf.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(sd[k], v), k
