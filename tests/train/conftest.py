"""Shared fixtures for the training tests: a small synthetic corpus, a tokenizer and prepared shards."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_corpus


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """In-process training runs on one thread. The models are tiny, so a second thread gains nothing, and
    under pytest-xdist (one worker per core) OpenMP threads oversubscribe the cores: every op then waits
    for a descheduled thread and a run gets several times slower. Subprocesses get OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    return make_corpus(str(tmp_path_factory.mktemp("train_corpus")))


@pytest.fixture(scope="session")
def tokenizer_path(corpus, tmp_path_factory) -> str:
    from openjamba.train.data import iter_texts
    from openjamba.train.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(iter_texts([corpus]), 300, show_progress=False).save(path)
    return path


@pytest.fixture(scope="session")
def data_dir(corpus, tokenizer_path, tmp_path_factory) -> str:
    from openjamba.train.data import prepare

    out = str(tmp_path_factory.mktemp("shards") / "data")
    prepare([corpus], tokenizer_path, out, val_fraction=0.2, seed=0, workers=1, progress=False)
    return out
