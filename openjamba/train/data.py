"""Token shards: text sources -> shuffled, tokenised, memory-mapped shards -> packed fixed-length batches.

On disk (one directory per prepared corpus):

    index.json            {"dtype": "uint16", "vocab_size": ..., "eos_token_id": ..., "splits": {...}}
    tokenizer.json        the tokenizer the shards were made with
    train_00000.bin ...   raw uint16 (vocab <= 65536) or uint32 token ids, documents separated by EOS
    val_00000.bin ...

Documents are shuffled once, by document and with a seed, before tokenising, so the shards (and the
train/val split) are the same whatever the number of worker processes.

The loader views a split as one token stream and cuts it into windows of seq_len + 1 tokens with stride
seq_len (every token is a target exactly once per epoch). Windows are visited in a seeded permutation
per epoch; each global batch takes world_size * batch_size consecutive permutation entries and rank r
reads its own slice. The state is just (epoch, position): resuming is exact.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import Pool
from typing import Iterable, Iterator

import numpy as np
import torch

INDEX = "index.json"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ".html", ".js", ".cpp", ".java", ".tex")


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class DocRef:
    """Where one document lives: a whole file, a byte range (a .jsonl line) or a parquet row."""

    path: str
    kind: str  # "file", "jsonl", "parquet"
    start: int = 0  # byte offset (jsonl) or row (parquet)
    length: int = -1  # bytes (jsonl)


def _files(inputs: Iterable[str]) -> list[str]:
    """Expand files and directories (recursively, text-like, .jsonl and .parquet files) in sorted order."""
    out = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                for name in sorted(names):
                    if name.endswith(TEXT_SUFFIXES + (".jsonl", ".parquet")) and not name.startswith("."):
                        out.append(os.path.join(root, name))
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} is neither a file nor a directory")
    return out


def list_documents(inputs: Iterable[str]) -> list[DocRef]:
    """Every document of the inputs, in a deterministic order (sorted paths, then position in the file)."""
    docs: list[DocRef] = []
    for path in _files(inputs):
        if path.endswith(".jsonl"):
            offset = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        docs.append(DocRef(path, "jsonl", offset, len(line)))
                    offset += len(line)
        elif path.endswith(".parquet"):
            pq = _pyarrow_parquet()
            rows = pq.ParquetFile(path).metadata.num_rows
            docs.extend(DocRef(path, "parquet", i) for i in range(rows))
        else:
            docs.append(DocRef(path, "file"))
    return docs


class MissingDependencyError(ImportError):
    """An input needs an optional package: the message says which, and how to install it."""


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading .parquet files needs pyarrow: install openjamba[train] (pyarrow), "
                                     "e.g. pip install 'openjamba[train]'") from None
    return pq


@lru_cache(maxsize=4)
def _parquet_column(path: str, field: str) -> list:
    return _pyarrow_parquet().read_table(path, columns=[field]).column(field).to_pylist()


def read_document(doc: DocRef, text_field: str = "text") -> str:
    """The text of one document (invalid UTF-8 is replaced, not fatal)."""
    if doc.kind == "file":
        with open(doc.path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    if doc.kind == "jsonl":
        with open(doc.path, "rb") as f:
            f.seek(doc.start)
            record = json.loads(f.read(doc.length))
        if text_field not in record:
            raise KeyError(f"{doc.path}: a line at byte {doc.start} has no {text_field!r} field")
        return str(record[text_field])
    return str(_parquet_column(doc.path, text_field)[doc.start] or "")


def iter_texts(inputs: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """All document texts of the inputs in order (used to train a tokenizer)."""
    for doc in list_documents(inputs):
        yield read_document(doc, text_field)


# ---------------------------------------------------------------------------------------------- prepare
_worker_tokenizer = None
_worker_field = "text"


def _init_worker(tokenizer_path: str, text_field: str) -> None:
    global _worker_tokenizer, _worker_field
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)
    _worker_field = text_field


def _tokenize_chunk(docs: list[DocRef]) -> list[list[int]]:
    texts = [read_document(d, _worker_field) for d in docs]
    return [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token ids to <split>_NNNNN.bin files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.docs = 0

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            self.file.write(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)
        self.docs += 1

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(os.path.join(self.out_dir, name), "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def summary(self) -> dict:
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "docs": self.docs}


def prepare(inputs: list[str], tokenizer_path: str, out_dir: str, *, val_fraction: float = 0.01,
            seed: int = 0, workers: int | None = None, shard_tokens: int = 100_000_000,
            text_field: str = "text", chunk_docs: int = 64, progress: bool = True) -> dict:
    """Tokenise `inputs` into shards under `out_dir`; returns the index (also written to index.json).

    Each document is encoded without special tokens and followed by EOS. Documents are shuffled with
    `seed` and the first ceil(val_fraction * n) go to the validation split.
    """
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from .tokenizer import special_token_ids

    tok = Tokenizer.from_file(tokenizer_path)
    vocab_size = tok.get_vocab_size()
    special = special_token_ids(tok)
    eos = special["eos_token_id"]
    if eos is None:
        raise ValueError(f"{tokenizer_path} has no end-of-sequence token (<|endoftext|> or </s>)")
    docs = list_documents(inputs)
    if not docs:
        raise ValueError(f"no documents found in {inputs}")
    order = np.random.default_rng(seed).permutation(len(docs))
    docs = [docs[i] for i in order]
    n_val = min(len(docs) - 1, math.ceil(val_fraction * len(docs))) if val_fraction > 0 else 0
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_dtype(vocab_size)
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [docs[i:i + chunk_docs] for i in range(0, len(docs), chunk_docs)]
    writers = {"val": _ShardWriter(out_dir, "val", dtype, shard_tokens),
               "train": _ShardWriter(out_dir, "train", dtype, shard_tokens)}
    bar = tqdm(total=len(docs), desc="tokenising", unit="doc", disable=not progress)
    done = 0

    def consume(results: Iterable[list[list[int]]]) -> None:
        nonlocal done
        for chunk_ids in results:
            for ids in chunk_ids:
                writers["val" if done < n_val else "train"].write(ids + [eos])
                done += 1
            bar.update(len(chunk_ids))

    if workers > 1 and len(chunks) > 1:
        # imap keeps the input order, so the shards do not depend on the worker count.
        with Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, text_field)) as pool:
            consume(pool.imap(_tokenize_chunk, chunks))
    else:
        _init_worker(tokenizer_path, text_field)
        consume(map(_tokenize_chunk, chunks))
    bar.close()
    for w in writers.values():
        w.close()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    index = {"version": 1, "dtype": dtype.name, "vocab_size": vocab_size, **special, "seed": seed,
             "val_fraction": val_fraction, "splits": {name: w.summary() for name, w in writers.items()}}
    tmp = os.path.join(out_dir, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, INDEX))
    return index


def read_index(data_dir: str) -> dict:
    path = os.path.join(data_dir, INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{data_dir} has no {INDEX}: make it with `openjamba data prepare`")
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- loader
class TokenStream:
    """A split's shards as one read-only token array (memory-mapped, nothing loaded up front)."""

    def __init__(self, data_dir: str, split: str):
        index = read_index(data_dir)
        if split not in index["splits"]:
            raise KeyError(f"{data_dir} has no split {split!r}")
        dtype = np.dtype(index["dtype"])
        self.arrays = [np.memmap(os.path.join(data_dir, s["file"]), dtype=dtype, mode="r", shape=(s["tokens"],))
                       for s in index["splits"][split]["shards"] if s["tokens"] > 0]
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.vocab_size = index["vocab_size"]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), possibly spanning shards, as int64."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            a = self.arrays[shard]
            lo = start + filled - int(self.starts[shard])
            take = min(length - filled, a.size - lo)
            out[filled:filled + take] = a[lo:lo + take]
            filled += take
            shard += 1
        return out


class PackedLoader:
    """Fixed (batch_size, seq_len + 1) batches of packed tokens for one data-parallel rank."""

    def __init__(self, data_dir: str, split: str, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.stream = TokenStream(data_dir, split)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_windows = (len(self.stream) - 1) // seq_len
        self.global_batch = batch_size * world_size
        if self.num_windows < self.global_batch:
            raise ValueError(f"split {split!r} of {data_dir} has {len(self.stream)} tokens: fewer than one "
                             f"global batch of {self.global_batch} x {seq_len + 1}")
        # Whole global batches per epoch: every rank sees the same number of batches.
        self.batches_per_epoch = self.num_windows // self.global_batch
        self.epoch, self.position = 0, 0  # position: global batches already served in this epoch
        self._perm_epoch, self._perm = -1, None

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                self._perm = np.arange(self.num_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) int64 batch of this rank; epochs roll over by themselves."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        first = self.position * self.global_batch + self.rank * self.batch_size
        windows = self._order()[first:first + self.batch_size]
        L = self.seq_len
        rows = [self.stream.read(int(w) * L, L + 1) for w in windows]
        self.position += 1
        return torch.from_numpy(np.stack(rows))

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (same data, sequence length and global batch)."""
        for key in ("seq_len", "global_batch", "num_windows", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data position: {key} was {state[key]}, now {getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
