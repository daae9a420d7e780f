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


def test_compiling_layers_loads_every_kernel_first(monkeypatch):
    """parallelize(compile=True) imports each op's kernel module before it compiles the layers: an import
    first reached while Dynamo traces a layer would split that layer's graph."""
    from openjamba import JambaConfig, JambaForCausalLM
    from openjamba.train.distributed import DistInfo, parallelize

    monkeypatch.setattr(ops, "_kernels", {})
    parallelize(JambaForCausalLM(JambaConfig.from_name("jamba-tiny")), DistInfo(device=torch.device("cpu")),
                compile=True)
    assert set(ops._kernels) == set(ops._OPS)
    assert not [op for op, k in ops._kernels.items() if isinstance(k, Exception)]
