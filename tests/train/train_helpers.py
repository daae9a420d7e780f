"""Helpers for the training tests: a synthetic corpus and a tiny run config."""

from __future__ import annotations

import json
import os
import random

from openjamba.train.config import TrainConfig
WORDS = ("def class return import self value list dict for while if else elif try except with as yield "
         "lambda None True False print range len open read write data model token layer expert").split()


def make_corpus(root: str, n_docs: int = 60, seed: int = 0) -> str:
    """`n_docs` small text files of pseudo-code (varied lengths, some non-ASCII) under root/corpus."""
    rng = random.Random(seed)
    corpus = os.path.join(root, "corpus")
    os.makedirs(os.path.join(corpus, "sub"), exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(rng.randint(3, 40)):
            indent = "    " * rng.randint(0, 2)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + ":")
        if i % 7 == 0:
            lines.append("# café ü 数据")
        folder = corpus if i % 2 else os.path.join(corpus, "sub")
        with open(os.path.join(folder, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return corpus


def tiny_config(data_dir: str, out_dir: str, **sections) -> TrainConfig:
    """A jamba-tiny run on the prepared shards that takes well under a second per step on a CPU."""
    cfg = TrainConfig()
    cfg.model.preset = "jamba-tiny"
    cfg.model.overrides = {"vocab_size": 300}
    cfg.data.train = data_dir
    cfg.data.seq_len, cfg.data.batch_size = 32, 4
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 2
    cfg.train.out_dir = out_dir
    cfg.train.max_steps = 8
    cfg.train.device = "cpu"
    cfg.train.export = False
    cfg.eval.interval, cfg.eval.steps = 4, 2
    cfg.checkpoint.interval = 4
    cfg.log.interval, cfg.log.progress, cfg.log.tensorboard = 1, False, False
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    cfg.validate()
    return cfg


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
