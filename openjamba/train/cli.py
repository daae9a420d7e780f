"""`openjamba` subcommands for training. Each verb is a plain function `cmd_<verb>(args) -> int`.

    openjamba tokenizer train INPUT... --vocab-size 32768 --out tokenizer.json
    openjamba data prepare INPUT... --tokenizer tokenizer.json --out data/corpus [--val-fraction 0.01]
    openjamba train --config configs/jamba-10m.toml [--set optim.lr=1e-3 ...] [--resume]
    openjamba export --run runs/x [--checkpoint step_00001000] --out hf/x
    openjamba quickstart [--out runs/quickstart]

Multi-GPU / multi-process: `torchrun --nproc_per_node=N -m openjamba train --config ...`.
"""

from __future__ import annotations

import json
import os
import sys


def _usage_error(message: str):
    from ..cli import UsageError

    return UsageError(message)


def cmd_tokenizer_train(args) -> int:
    """Train a byte-level BPE tokenizer on text files / directories / .jsonl / .parquet."""
    from .data import MissingDependencyError, iter_texts, list_documents
    from .tokenizer import special_token_ids, train_tokenizer

    try:
        n_docs = len(list_documents(args.inputs))
    except (FileNotFoundError, MissingDependencyError) as e:
        raise _usage_error(str(e)) from None
    tok = train_tokenizer(iter_texts(args.inputs, args.text_field), args.vocab_size,
                          min_frequency=args.min_frequency, length=n_docs)
    out = args.out
    if os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, "tokenizer.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tok.save(out)
    print(f"{out}: {tok.get_vocab_size()} tokens from {n_docs} documents; special ids {special_token_ids(tok)}")
    return 0


def cmd_data_prepare(args) -> int:
    """Tokenise inputs into shuffled uint16/uint32 shards with a train/val split and a JSON index."""
    from .data import MissingDependencyError, prepare

    if not os.path.exists(args.tokenizer):
        raise _usage_error(f"tokenizer {args.tokenizer!r} does not exist (make one with `openjamba tokenizer train`)")
    if not 0 <= args.val_fraction < 1:
        raise _usage_error("--val-fraction must be in [0, 1)")
    try:
        index = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                        workers=args.workers, shard_tokens=args.shard_tokens, text_field=args.text_field)
    except (FileNotFoundError, ValueError, MissingDependencyError) as e:
        raise _usage_error(str(e)) from None
    for name, split in index["splits"].items():
        print(f"{name}: {split['docs']:,} documents, {split['tokens']:,} tokens in {len(split['shards'])} shards")
    print(f"index: {os.path.join(args.out, 'index.json')}")
    return 0


def cmd_train(args) -> int:
    """Train from a TOML config with --set overrides; --resume continues from the latest checkpoint."""
    from .config import TrainConfigError, load_config
    from .trainer import NonFiniteLossError, train

    try:
        cfg = load_config(args.config, args.set)
    except TrainConfigError as e:
        raise _usage_error(str(e)) from None
    if not cfg.data.train:
        raise _usage_error("data.train is not set: pass --config FILE or --set data.train=DIR "
                           "(a directory made by `openjamba data prepare`)")
    if not os.path.exists(os.path.join(cfg.data.train, "index.json")):
        raise _usage_error(f"data.train {cfg.data.train!r} has no index.json: make it with `openjamba data prepare`")
    try:
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"openjamba train: {e}", file=sys.stderr)
        return 1
    if summary.get("checkpoint"):  # main rank only
        first, last = summary["first_loss"], summary["last_loss"]
        losses = f", loss {first:.4f} -> {last:.4f}" if first is not None and last is not None else ""
        print(f"done: {summary['steps']} steps ({summary['stop_reason']}){losses}; checkpoint {summary['checkpoint']}"
              + (f"; HF export {summary['hf_dir']}" if "hf_dir" in summary else ""))
        if summary.get("sample"):
            print(f"sample:\n{summary['sample']}")
    return 0


def cmd_export(args) -> int:
    """Convert a training checkpoint to the HF directory format (config.json, safetensors, tokenizer.json)."""
    from safetensors.torch import load_file

    from ..config import JambaConfig
    from ..model import JambaForCausalLM
    from . import checkpointing as ckpt
    from .tokenizer import load_tokenizer

    manager = ckpt.CheckpointManager(args.run)
    path = os.path.join(manager.root, args.checkpoint) if args.checkpoint else manager.latest()
    if path is None or not os.path.exists(os.path.join(path, "trainer_state.json")):
        raise _usage_error(f"no checkpoint found under {manager.root}")
    with open(os.path.join(path, "trainer_state.json")) as f:
        config = JambaConfig.from_dict(json.load(f)["model_config"])
    model = JambaForCausalLM(config)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    model.to(next(iter(tensors.values())).dtype)
    ckpt.load_model_state(model, tensors)
    tok = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok):
        model.tokenizer = load_tokenizer(tok)
    model.save_pretrained(args.out)
    print(f"{path} -> {args.out}")
    return 0


def cmd_quickstart(args) -> int:
    """Tokenise the Python standard library, train a small hybrid on the CPU, sample, save an HF checkpoint."""
    from .quickstart import main

    return main(args)


def add_commands(subparsers) -> None:
    """Register the training subcommands on the `openjamba` argument parser."""
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a tokenizer on text files, directories, .jsonl or .parquet")
    t.add_argument("inputs", nargs="+", help="files or directories")
    t.add_argument("--vocab-size", type=int, default=32768)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--text-field", default="text", help="field of .jsonl / .parquet records (default text)")
    t.add_argument("--out", required=True, help="tokenizer.json path (or a directory)")
    t.set_defaults(func=cmd_tokenizer_train)

    p = subparsers.add_parser("data", help="prepare tokenised training shards")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = sub.add_parser("prepare", help="tokenise text into shuffled shards with a train/val split")
    d.add_argument("inputs", nargs="+", help="text files, directories, .jsonl or .parquet files")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--val-fraction", type=float, default=0.01, help="documents held out (default 0.01)")
    d.add_argument("--seed", type=int, default=0, help="document shuffle seed")
    d.add_argument("--workers", type=int, default=None, help="tokenising processes (default: CPUs, at most 8)")
    d.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    d.add_argument("--text-field", default="text", help="field of .jsonl / .parquet records (default text)")
    d.set_defaults(func=cmd_data_prepare)

    p = subparsers.add_parser("train", help="train a model from a TOML config (torchrun for several processes)")
    p.add_argument("--config", default=None, help="TOML run file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("export", help="write a training checkpoint in the HF directory format")
    p.add_argument("--run", required=True, help="the run's out_dir")
    p.add_argument("--checkpoint", default=None, help="a checkpoint name such as step_00001000 (default: latest)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export)

    from .quickstart import add_arguments

    p = subparsers.add_parser("quickstart", help="train a small hybrid on the Python standard library (CPU, minutes)")
    add_arguments(p)
    p.set_defaults(func=cmd_quickstart)
