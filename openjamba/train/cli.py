"""`openjamba` subcommands for training (data, tokenizer, train)."""


def add_commands(subparsers) -> None:
    """Register the training subcommands on the `openjamba` argument parser."""
