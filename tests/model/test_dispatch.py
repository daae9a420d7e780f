import pytest
import torch

from openjamba import ops


@pytest.fixture(autouse=True)
def _restore_backend():
    before = ops.get_backend()
    yield
    ops.set_backend(before)


def test_auto_uses_reference_on_cpu():
    ops.set_backend("auto")
    fn, choice = ops.resolve("selective_scan", on_cuda=False)
    assert choice == "reference" and fn is ops.selective_scan_chunked


def test_forcing_triton_without_cuda_or_interpreter_is_an_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ops.BackendUnavailable, match="triton"):
        ops.set_backend("triton")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown ops backend 'cuda'"):
        ops.set_backend("cuda")


def test_reference_forced_everywhere():
    ops.set_backend("reference")
    assert ops.resolve("moe_experts", on_cuda=True)[1] == "reference"
