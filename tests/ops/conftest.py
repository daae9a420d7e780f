"""Kernel tests: a `device` fixture (CUDA when present, else the CPU under the Triton interpreter)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
