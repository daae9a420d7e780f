"""Token shards and the packed loader: round trip, deterministic shuffle, exact resume, rank sharding."""

from __future__ import annotations

import filecmp
import json
import os
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from openjamba.cli import main
from openjamba.train.data import (MissingDependencyError, PackedLoader, TokenStream, list_documents, prepare,
                                  read_document, read_index)


def _split_tokens(data_dir: str, split: str) -> np.ndarray:
    stream = TokenStream(data_dir, split)
    return stream.read(0, len(stream))


def test_round_trip_tokens_are_the_shuffled_documents(corpus, tokenizer_path, data_dir):
    index = read_index(data_dir)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 300 and index["eos_token_id"] == 2
    docs = list_documents([corpus])
    order = np.random.default_rng(0).permutation(len(docs))
    tok = Tokenizer.from_file(tokenizer_path)
    expected = []
    for i in order:
        expected += tok.encode(read_document(docs[i]), add_special_tokens=False).ids + [2]
    n_val = index["splits"]["val"]["docs"]
    assert n_val == 12 and index["splits"]["train"]["docs"] == len(docs) - n_val
    got = np.concatenate([_split_tokens(data_dir, "val"), _split_tokens(data_dir, "train")])
    assert got.tolist() == expected
    # Decoding one document gives back its text exactly (non-ASCII included).
    first = tok.encode(read_document(docs[order[0]]), add_special_tokens=False).ids
    assert tok.decode(first) == read_document(docs[order[0]])


def test_shuffle_is_deterministic_and_independent_of_workers(corpus, tokenizer_path, data_dir, tmp_path):
    a = str(tmp_path / "a")
    prepare([corpus], tokenizer_path, a, val_fraction=0.2, seed=0, workers=2, chunk_docs=5, shard_tokens=500,
            progress=False)
    assert np.array_equal(_split_tokens(a, "train"), _split_tokens(data_dir, "train"))
    assert np.array_equal(_split_tokens(a, "val"), _split_tokens(data_dir, "val"))
    assert len(read_index(a)["splits"]["train"]["shards"]) > 2  # small shards really split the stream
    b = str(tmp_path / "b")
    prepare([corpus], tokenizer_path, b, val_fraction=0.2, seed=1, workers=1, progress=False)
    assert not np.array_equal(_split_tokens(b, "val"), _split_tokens(data_dir, "val"))
    assert sorted(_split_tokens(b, "train").tolist() + _split_tokens(b, "val").tolist()) == \
        sorted(_split_tokens(data_dir, "train").tolist() + _split_tokens(data_dir, "val").tolist())
    c = str(tmp_path / "c")
    prepare([corpus], tokenizer_path, c, val_fraction=0.2, seed=0, workers=1, progress=False)
    assert filecmp.cmp(os.path.join(c, "train_00000.bin"), os.path.join(data_dir, "train_00000.bin"), shallow=False)


def test_jsonl_input_reads_the_text_field(tokenizer_path, tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = [f"record {i} says hello world" for i in range(20)]
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"id": 1, "text": t}) + "\n\n")  # blank lines are skipped
    docs = list_documents([str(path)])
    assert [read_document(d) for d in docs] == texts
    out = str(tmp_path / "out")
    index = prepare([str(path)], tokenizer_path, out, val_fraction=0.0, workers=1, progress=False)
    assert index["splits"]["train"]["docs"] == 20 and index["splits"]["val"]["tokens"] == 0
    tok = Tokenizer.from_file(tokenizer_path)
    assert tok.decode(_split_tokens(out, "train").tolist(), skip_special_tokens=True).count("hello world") == 20


def test_windows_cover_the_stream_once_per_epoch(data_dir):
    L, B = 16, 3
    loader = PackedLoader(data_dir, "train", L, B, shuffle=True, seed=3)
    stream = _split_tokens(data_dir, "train")
    windows = {}  # every window the stream holds (stride L) -> its start
    for s in range(0, len(stream) - L, L):
        windows.setdefault(tuple(stream[s:s + L + 1].tolist()), s)
    seen = set()
    for _ in range(loader.batches_per_epoch):
        batch = loader.next_batch()
        assert batch.shape == (B, L + 1) and batch.dtype == torch.int64
        for row in batch:
            # Each row is a contiguous slice of the stream starting at a multiple of L.
            seen.add(windows[tuple(row.tolist())])
    assert len(seen) == loader.batches_per_epoch * B  # no window twice within an epoch
    loader.next_batch()
    assert loader.epoch == 1


def test_loader_resumes_at_the_exact_position(data_dir):
    loader = PackedLoader(data_dir, "train", 16, 2, seed=5)
    n = loader.batches_per_epoch
    for _ in range(n - 2):  # stop just before an epoch boundary
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # the state survives JSON
    expected = [loader.next_batch() for _ in range(5)]
    resumed = PackedLoader(data_dir, "train", 16, 2, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch(), want)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(data_dir, "train", 8, 2, seed=5).load_state_dict(state)


def test_ranks_split_each_global_batch(data_dir):
    whole = PackedLoader(data_dir, "train", 16, 4, seed=1)
    ranks = [PackedLoader(data_dir, "train", 16, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(whole.batches_per_epoch + 2):  # across an epoch boundary too
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat(parts), whole.next_batch())
        assert not torch.equal(parts[0], parts[1])
    with pytest.raises(ValueError):
        PackedLoader(data_dir, "train", 16, 2, rank=2, world_size=2)


def test_parquet_input_reads_the_text_column(tokenizer_path, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i}: def f(x): return x * {i}" for i in range(30)]
    pq.write_table(pa.table({"content": texts, "n": list(range(30))}), str(tmp_path / "rows.parquet"))
    docs = list_documents([str(tmp_path)])
    assert len(docs) == 30 and [read_document(d, "content") for d in docs] == texts
    index = prepare([str(tmp_path / "rows.parquet")], tokenizer_path, str(tmp_path / "out"), val_fraction=0.1,
                    text_field="content", workers=2, chunk_docs=4, progress=False)
    assert index["splits"]["val"]["docs"] == 3 and index["splits"]["train"]["docs"] == 27
    tok = Tokenizer.from_file(tokenizer_path)
    text = tok.decode(np.concatenate([_split_tokens(str(tmp_path / "out"), s) for s in ("val", "train")]).tolist())
    assert sorted(text.split("row ")[1:]) == sorted(t[4:] for t in texts)


def test_parquet_without_pyarrow_says_what_to_install(tokenizer_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # imports fail as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match=r"install openjamba\[train\] \(pyarrow\)"):
        list_documents([str(tmp_path)])
    for argv in (["data", "prepare", str(tmp_path), "--tokenizer", tokenizer_path, "--out", str(tmp_path / "out")],
                 ["tokenizer", "train", str(tmp_path), "--out", str(tmp_path / "tok.json")]):
        assert main(argv) == 2
        assert "reading .parquet files needs pyarrow: install openjamba[train] (pyarrow)" in capsys.readouterr().err
