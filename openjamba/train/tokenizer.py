"""Byte-level BPE tokenizer training with HF `tokenizers`, and reading the special-token ids back.

The special tokens take the first ids so that they match JambaConfig's defaults
(pad_token_id=0, bos_token_id=1, eos_token_id=2) and the names Jamba's own tokenizer uses.
"""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
# Names other tokenizers use for the same roles, so an existing tokenizer.json can be used as is.
_ALIASES = {
    "pad_token_id": (PAD, "<pad>", "[PAD]"),
    "bos_token_id": (BOS, "<s>", "<|begin_of_text|>", "<bos>"),
    "eos_token_id": (EOS, "</s>", "<|end_of_text|>", "<eos>"),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    length: int | None = None, show_progress: bool = True) -> Tokenizer:
    """A byte-level BPE tokenizer (any byte sequence encodes; no unknown token) trained on `texts`."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte tokens + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int | None]:
    """pad/bos/eos token ids found in `tok` (None where it has no such token)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    out = {}
    for key, names in _ALIASES.items():
        out[key] = next((vocab[n] for n in names if n in vocab), None)
    return out


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json file, or a directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}")
    return Tokenizer.from_file(path)
