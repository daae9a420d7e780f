"""The quick start: train a small Jamba hybrid on this machine's Python standard library, on a CPU, in minutes.

    openjamba quickstart                  (or: python -m openjamba.train.quickstart)

1. collects the standard library's top-level .py files (about 4.7 MB of real code on every machine),
2. trains a byte-level BPE tokenizer on them,
3. tokenises them into shuffled shards with a validation split,
4. times a training step here and fits the number of steps to a time budget (150 s by default),
   then trains a 1.9M-parameter hybrid (Mamba + attention layers, dense + MoE feed-forwards) with a progress bar,
5. writes an HF-format checkpoint (config.json, model.safetensors, tokenizer.json) and prints a sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time

from .config import TrainConfig, apply_overrides


def stdlib_files(limit_bytes: int | None = None) -> list[str]:
    """The standard library's top-level .py files, in sorted order, up to `limit_bytes` in total."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".py"))
    if limit_bytes:
        out, total = [], 0
        for f in files:
            total += os.path.getsize(f)
            if total > limit_bytes:
                break
            out.append(f)
        files = out
    if not files:
        raise FileNotFoundError(f"no .py files in {root}")
    return files


def quickstart_config(out_dir: str) -> TrainConfig:
    """A hybrid small enough to learn visibly in a few CPU minutes: 4 layers (Mamba, Mamba+MoE,
    attention, Mamba+MoE), hidden 128, SSM state 8, 4 experts top-2, vocabulary 2048."""
    cfg = TrainConfig()
    cfg.model.preset = "jamba-10m"
    cfg.model.overrides = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, attn_layer_period=4,
                               attn_layer_offset=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                               mamba_dt_rank=8, mamba_d_state=8)
    cfg.data.train = os.path.join(out_dir, "data")
    cfg.data.seq_len, cfg.data.batch_size = 128, 16
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 3e-3, 20, 0.1
    cfg.train.out_dir = out_dir
    cfg.train.max_steps = 300  # `openjamba quickstart` fits this to the machine (see seconds_per_step)
    cfg.train.max_seconds = 210.0  # a hard stop, with a final checkpoint, on a much slower machine
    cfg.train.device = "cpu"
    cfg.train.sample_prompt = "def "
    cfg.train.sample_tokens = 80
    cfg.eval.interval, cfg.eval.steps = 100, 8
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = 100, 2
    cfg.log.interval = 10
    cfg.log.tensorboard = False  # metrics.jsonl only: the quick start needs no extra packages
    return cfg


def seconds_per_step(cfg: TrainConfig, vocab_size: int, special: dict, repeats: int = 3) -> float:
    """Wall time of one training step of `cfg`'s model on this machine (random tokens, after a
    warm-up step), to fit the number of steps, and so a fully decayed schedule, into the time budget."""
    import torch

    from .optim import build_optimizer
    from .distributed import DistInfo
    from .trainer import build_model, forward_backward

    model = build_model(cfg, vocab_size, special)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    batch = torch.randint(0, vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        forward_backward(model, [batch], model.config, cfg, "fp32", DistInfo().device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the machine's speed; slower repeats are other processes' noise


def run(out_dir: str = "runs/quickstart", overrides: list[str] = (), vocab_size: int = 2048,
        limit_bytes: int | None = None, workers: int = 2, budget_seconds: float = 150.0) -> dict:
    """Every step of the quick start; returns the training summary."""
    from .data import iter_texts, prepare
    from .tokenizer import special_token_ids, train_tokenizer
    from .trainer import train

    t0 = time.perf_counter()
    files = stdlib_files(limit_bytes)
    size = sum(os.path.getsize(f) for f in files)
    print(f"[1/4] corpus: {len(files)} Python files from {os.path.dirname(files[0])} ({size / 1e6:.1f} MB)")
    os.makedirs(out_dir, exist_ok=True)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    tok = train_tokenizer(iter_texts(files), vocab_size, length=len(files), show_progress=False)
    tok.save(tok_path)
    print(f"[2/4] tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens -> {tok_path}")
    index = prepare(files, tok_path, os.path.join(out_dir, "data"), val_fraction=0.05, seed=0, workers=workers)
    split = index["splits"]
    print(f"[3/4] shards: {split['train']['tokens']:,} train / {split['val']['tokens']:,} val tokens "
          f"({time.perf_counter() - t0:.1f} s so far)")
    cfg = apply_overrides(quickstart_config(out_dir), list(overrides))
    if not any(o.startswith("train.max_steps") for o in overrides):
        # As many steps as fit in the budget on this machine, so the cosine schedule ends when time does.
        per_step = seconds_per_step(cfg, tok.get_vocab_size(), special_token_ids(tok))
        cfg.train.max_steps = int(min(600, max(150, 0.85 * budget_seconds / per_step)))
        print(f"      {per_step:.2f} s per step here: {cfg.train.max_steps} steps fit in {budget_seconds:.0f} s")
    print(f"[4/4] training for {cfg.train.max_steps} steps (stopping at {cfg.train.max_seconds:.0f} s at the latest)")
    summary = train(cfg)
    summary["total_seconds"] = time.perf_counter() - t0
    print(f"\nloss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over {summary['steps']} steps"
          + (f"; validation loss {summary['val_losses'][-1][1]:.3f}" if summary["val_losses"] else ""))
    if "sample" in summary:
        print(f"sample (prompt {cfg.train.sample_prompt!r}):\n{'-' * 60}\n{summary['sample']}\n{'-' * 60}")
    if "hf_dir" in summary:
        print(f"HF-format checkpoint: {summary['hf_dir']}  (try: openjamba generate --model {summary['hf_dir']} "
              f"--prompt 'import ')")
    print(f"total time {summary['total_seconds']:.0f} s")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the training config, e.g. --set train.max_seconds=60")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--limit-mb", type=float, default=None, help="use only the first N MB of files")
    p.add_argument("--workers", type=int, default=2, help="tokenising processes")
    p.add_argument("--budget", type=float, default=150.0,
                   help="seconds of training to plan for (the step count is fitted to it; default 150)")


def main(args: argparse.Namespace) -> int:
    limit = int(args.limit_mb * 1e6) if args.limit_mb else None
    run(args.out, args.set, args.vocab_size, limit, args.workers, args.budget)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m openjamba.train.quickstart", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
