"""Long-range retrieval through the cache with a constructed passkey model (see inference/passkey.py)."""

import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.inference import generate
from openjamba.inference.passkey import make_passkey_model, passkey_config, passkey_prompt

KEY = 55  # a key token (the last 16 of 64 ids)


@pytest.fixture(scope="module")
def model():
    return make_passkey_model(JambaForCausalLM(passkey_config()).eval())


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("position", [0, 7, 700, 1023])
def test_key_is_retrieved_from_any_distance(model, mode, position):
    ids = passkey_prompt(1024 + 1, position, KEY, n_filler=48)
    out = generate(model, ids, max_new_tokens=3, temperature=0, mode=mode, chunk_size=128)
    assert out[0, -3:].tolist() == [KEY] * 3


def test_without_a_key_the_answer_is_filler(model):
    """The negative control: the answer comes from the key, not from a constant bias."""
    ids = passkey_prompt(600, 10, 3, n_filler=48)
    out = generate(model, ids, max_new_tokens=2, temperature=0, mode="static", chunk_size=128)
    assert all(t < 48 for t in out[0, -2:].tolist())


def test_key_survives_left_padding_and_batching(model):
    a = passkey_prompt(500, 3, KEY, n_filler=48)
    b = passkey_prompt(300, 250, KEY - 5, n_filler=48, seed=1)
    ids = torch.zeros(2, 500, dtype=torch.long)
    mask = torch.zeros(2, 500, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 200:], mask[1, 200:] = b[0], 1
    ids[1, :200] = KEY  # padding that would be retrieved if the mask leaked into the attention
    out = generate(model, ids, mask, max_new_tokens=2, temperature=0, mode="static", chunk_size=64)
    assert out[:, -1].tolist() == [KEY, KEY - 5]


def test_construction_holds_for_wide_models():
    """The score margin must not shrink with the hidden size (a wide model at 2K tokens, both dtypes)."""
    base = JambaConfig.from_name("jamba-tiny", hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                                 intermediate_size=64, num_hidden_layers=8, num_experts=2)
    torch.manual_seed(0)
    wide = make_passkey_model(JambaForCausalLM(passkey_config(base)).eval())
    for dtype in (torch.float32, torch.bfloat16):
        for position in (0, 1500):
            ids = passkey_prompt(2048, position, KEY, n_filler=48)
            out = generate(wide.to(dtype), ids, max_new_tokens=2, temperature=0, mode="static", chunk_size=512)
            assert out[0, -2:].tolist() == [KEY] * 2, (dtype, position)
