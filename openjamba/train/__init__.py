"""Training: token shards, tokenizer, trainer, distributed wrappers."""
