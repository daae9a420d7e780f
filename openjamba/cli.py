"""`openjamba <verb>`: the command line. Every verb is a plain function `cmd_<verb>(args) -> int`.

    openjamba presets                                       the named configs and their sizes
    openjamba params  --preset jamba-v0.1 | --model DIR     total / active parameters, breakdown, layer schedule
    openjamba memory  --preset jamba-v0.1 --context 256K [--batch 1] [--dtype bf16] [--compare] [--budget 80G]
    openjamba generate --model DIR --prompt "text" [--max-new-tokens 64 --temperature 0.8 --top-k --top-p --seed]

Training verbs are registered by `openjamba.train.cli.add_commands`. A verb reports a bad argument by
raising `UsageError`; `main` turns it into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .config import PRESETS, ConfigError, JambaConfig
from .memory import DTYPE_BYTES, compare_rows, format_bytes, format_count, memory_report, parse_tokens


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit code 2."""

    def __init__(self, message: str, prog: str = "openjamba"):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError (one line, no usage dump) so `main` can return 2 in-process."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


# ---------------------------------------------------------------------------------------------- helpers
def _load_config(args) -> tuple[JambaConfig, str]:
    """The config named by --preset or stored in --model DIR (config.json only: no weights are read)."""
    if getattr(args, "preset", None):
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
        return JambaConfig.from_name(args.preset), args.preset
    directory = args.model
    if not os.path.isdir(directory):
        raise UsageError(f"model directory {directory!r} does not exist")
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise UsageError(f"model directory {directory!r} has no config.json")
    return JambaConfig.from_pretrained(directory), directory


def _tokens(n: int) -> str:
    """'262,144 tokens (256K)': exact, and as context lengths are quoted."""
    for scale, unit in ((1024 ** 2, "M"), (1024, "K")):
        if n % scale == 0:
            return f"{n:,} tokens ({n // scale}{unit})"
    return f"{n:,} tokens"


def _positive_tokens(text: str) -> int:
    try:
        return parse_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget(text: str) -> int | str:
    """'cuda' (the device's free memory when the command runs) or a size in binary units: 80G, 141GiB, 512M."""
    import re

    if text == "cuda":
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*", text, flags=re.IGNORECASE)
    value = float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()) if m else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a memory size such as 80G, 141GiB or 512M, or 'cuda', "
                                         f"got {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _model_source(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help=f"a named config: {', '.join(PRESETS)}")
    group.add_argument("--model", metavar="DIR", help="a checkpoint directory (its config.json is read)")


def _schedule_lines(config: JambaConfig) -> list[str]:
    """The layer schedule, one line per Jamba block (attn_layer_period layers)."""
    cells = config.schedule().split()
    width = config.attn_layer_period
    lines = []
    for start in range(0, len(cells), width):
        end = min(start + width, len(cells)) - 1
        lines.append(f"  layers {start:>3}-{end:<3} {' '.join(cells[start:end + 1])}")
    return lines


# ---------------------------------------------------------------------------------------------- verbs
def cmd_presets(args) -> int:
    """List the named configs with their sizes."""
    print(f"{'preset':<16} {'total':>7} {'active':>7} {'layers':>6} {'hidden':>6} {'attn:mamba':>10} "
          f"{'experts':>9} {'vocab':>6}")
    for name in PRESETS:
        c = JambaConfig.from_name(name)
        counts = c.param_counts()
        n_attn = len(c.attention_layer_ids)
        experts = f"{c.num_experts} top-{c.num_experts_per_tok}" if c.num_experts > 1 else "dense"
        print(f"{name:<16} {format_count(counts['total']):>7} {format_count(counts['active']):>7} "
              f"{c.num_hidden_layers:>6} {c.hidden_size:>6} {f'{n_attn}:{c.num_hidden_layers - n_attn}':>10} "
              f"{experts:>9} {c.vocab_size:>6}")
    return 0


def cmd_params(args) -> int:
    """Total and active parameter counts, a per-component breakdown and the layer schedule."""
    config, name = _load_config(args)
    counts = config.param_counts()
    n_moe = sum(config.is_moe(i) for i in range(config.num_hidden_layers))
    print(f"{name}: {format_count(counts['total'])} total parameters, "
          f"{format_count(counts['active'])} active per token")
    notes = {
        "experts": f"{n_moe} MoE layers x {config.num_experts} experts, {config.num_experts_per_tok} active per token",
        "mlp": "dense SwiGLU MLPs",
        "lm_head": "tied to the embedding" if config.tie_word_embeddings else "",
    }
    for key in ("embedding", "lm_head", "attention", "mamba", "mlp", "experts", "router", "norms"):
        print(f"  {key:<10} {format_count(counts[key]):>7}  {counts[key]:>14,}  {notes.get(key, '')}".rstrip())
    for key in ("total", "active"):
        print(f"  {key:<10} {format_count(counts[key]):>7}  {counts[key]:>14,}")
    n_attn = len(config.attention_layer_ids)
    print(f"layers: {config.num_hidden_layers} ({n_attn} attention, {config.num_hidden_layers - n_attn} Mamba; "
          f"{n_moe} MoE)")
    print("schedule (A attention / M Mamba mixer; e MoE / d dense MLP):")
    print("\n".join(_schedule_lines(config)))
    return 0


def _print_plan(config, args) -> bool:
    """memory --budget: the serving plan (weights, cache, the prefill chunk that fits, decode workspace,
    reserve) against the budget; whether it fits."""
    import torch

    from .inference.planner import device_budget, plan_memory

    budget = args.budget
    if budget == "cuda":
        budget = device_budget("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    plan = plan_memory(config, dtype, args.batch, args.context, budget=budget)
    print()
    print(f"serving plan against {format_bytes(budget)}: {'fits' if plan.fits else 'does not fit'}")
    print(f"  {plan.describe()}")
    if plan.fits:
        print(f"  prefill in chunks of {plan.detail['chunk_size']} tokens per row")
    else:
        print(f"  over by {format_bytes(plan.total - budget)}: reduce batch or context, or use a smaller dtype")
    return plan.fits


def cmd_memory(args) -> int:
    """KV cache, Mamba state and weight memory for a context length; --compare adds the paper's table."""
    config, name = _load_config(args)
    if args.budget == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--budget cuda needs a CUDA device; give a size instead, such as --budget 80G")
    report = memory_report(config, args.context, args.batch, args.dtype)
    nbytes = DTYPE_BYTES[args.dtype]
    n_attn, n_mamba = len(config.attention_layer_ids), len(config.mamba_layer_ids)
    print(f"{name}: {_tokens(args.context)}, batch {args.batch}, {args.dtype}")
    print(f"  KV cache     {format_bytes(report['kv_cache']):>10}  = 2 (K,V) x {n_attn} attention layers x "
          f"{config.num_key_value_heads} KV heads x {config.head_dim} dims x {args.context:,} tokens x "
          f"{args.batch} x {nbytes} bytes")
    print(f"  Mamba state  {format_bytes(report['mamba_state']):>10}  = {n_mamba} Mamba layers x "
          f"{config.mamba_inner_size} channels x ({config.mamba_d_conv - 1} conv x {nbytes} bytes + "
          f"{config.mamba_d_state} SSM x 4 bytes) x {args.batch}; constant in context")
    total_params = config.param_counts()["total"]
    print(f"  weights      {format_bytes(report['weights']):>10}  = {format_count(total_params)} parameters x "
          f"{nbytes} bytes")
    print(f"  total        {format_bytes(report['total']):>10}  (activations not included)")
    fits = _print_plan(config, args) if args.budget is not None else True
    if args.compare:
        print()
        print(f"KV cache at {_tokens(args.context)}, batch {args.batch}, {args.dtype} "
              f"(2 x attention layers x KV heads x head dim x tokens x batch x {nbytes} bytes):")
        header = f"  {'model':<16} {'params':>7} {'active':>7} {'attn layers':>11} {'KV heads':>8} {'head dim':>8} {'KV cache':>11}"
        print(header)
        for row in compare_rows(config, name, args.context, args.batch, args.dtype):
            attn = (f"{row['attention_layers']} of {row['layers']}" if row["layers"] != row["attention_layers"]
                    else str(row["layers"]))
            print(f"  {row['name']:<16} {format_count(row['total']):>7} {format_count(row['active']):>7} "
                  f"{attn:>11} {row['kv_heads']:>8} {row['head_dim']:>8} {format_bytes(row['kv_cache']):>11}")
    return 0 if fits else 1


def cmd_generate(args) -> int:
    """Load a checkpoint and stream a continuation of the prompt to stdout."""
    import torch

    from .model import JambaForCausalLM

    if not os.path.isdir(args.model):
        raise UsageError(f"model directory {args.model!r} does not exist")
    if not os.path.exists(os.path.join(args.model, "config.json")):
        raise UsageError(f"model directory {args.model!r} has no config.json")
    if args.prompt_ids is None and not os.path.exists(os.path.join(args.model, "tokenizer.json")):
        raise UsageError(f"{args.model!r} has no tokenizer.json: pass the prompt as token ids with "
                         "--prompt-ids 1,2,3 instead of --prompt")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    try:
        model = JambaForCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load {args.model!r}: {e}") from None
    model.eval()
    tok = model.tokenizer
    if args.prompt_ids is not None:
        prompt_ids = args.prompt_ids
    elif tok is None:
        raise UsageError(f"the checkpoint loader found no tokenizer in {args.model!r}: use --prompt-ids 1,2,3")
    else:
        prompt_ids = tok.encode(args.prompt).ids
        if not prompt_ids:
            raise UsageError("the prompt encodes to no tokens")
    eos = None if args.ignore_eos else model.config.eos_token_id
    try:
        steps = model.generate_stream(torch.tensor([prompt_ids]), max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      eos_token_id=eos, seed=args.seed)
    except ValueError as e:  # e.g. prompt ids outside the vocabulary
        raise UsageError(str(e)) from None

    out = sys.stdout
    new: list[int] = []
    start = time.perf_counter()
    if tok is None:
        out.write(" ".join(map(str, prompt_ids)))
        for token in steps:
            new.append(int(token[0]))
            out.write(f" {new[-1]}")
            out.flush()
    else:
        prefix = tok.decode(prompt_ids)
        out.write(prefix)
        shown = ""
        for token in steps:
            new.append(int(token[0]))
            shown = _write_new_text(out, tok, prompt_ids, new, prefix, shown)
        _write_new_text(out, tok, prompt_ids, new, prefix, shown, final=True)
    out.write("\n")
    out.flush()
    seconds = time.perf_counter() - start
    print(f"[{len(new)} tokens in {seconds:.2f} s, {len(new) / max(seconds, 1e-9):.1f} tokens/s, "
          f"{device}, {str(model.dtype).replace('torch.', '')}]", file=sys.stderr)
    return 0


def _write_new_text(out, tok, prompt_ids, new, prefix, shown, final=False) -> str:
    """Write the text that `new` adds beyond what is already shown; return the text shown so far.

    Decoding prompt + new together keeps word boundaries (a leading space lives in the token's context),
    and a trailing U+FFFD means a multi-byte character is split across tokens: wait for the rest (unless
    `final`: then it was a genuinely invalid byte sequence and is shown as is).
    """
    text = tok.decode(list(prompt_ids) + new)
    text = text[len(prefix):] if text.startswith(prefix) else tok.decode(new)
    if (text.endswith("\ufffd") and not final) or not text.startswith(shown):
        return shown
    out.write(text[len(shown):])
    out.flush()
    return text


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative comma-separated token ids, got {text!r}")
    return ids


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="openjamba", description="Jamba (hybrid attention + Mamba + MoE) in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("presets", help="list the named configs with their parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("params", help="total / active parameters, breakdown and layer schedule")
    _model_source(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("memory", help="KV cache, Mamba state and weight memory at a context length")
    _model_source(p)
    p.add_argument("--context", type=_positive_tokens, required=True, metavar="N",
                   help="tokens per sequence: 262144, 256K or 1M")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences (default 1)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16", help="weights and cache (default bf16)")
    p.add_argument("--compare", action="store_true", help="add the paper's KV-cache table of Transformers")
    p.add_argument("--budget", type=_budget, metavar="SIZE",
                   help="also plan serving (weights, cache, prefill chunk, workspaces) against SIZE (80G, 141GiB) "
                        "or 'cuda' (the device's free memory); exit code 1 when it does not fit")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("generate", help="stream a continuation of a prompt from a checkpoint")
    p.add_argument("--model", metavar="DIR", required=True, help="checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    src.add_argument("--prompt-ids", type=_token_ids, metavar="IDS", help="prompt as token ids: 1,2,3")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus filter in (0, 1]")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default=None, help="default: as stored")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.set_defaults(func=cmd_generate)

    from .bench_cli import add_commands as add_bench_commands
    from .train.cli import add_commands as add_train_commands

    add_train_commands(sub)
    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as e:
        print(f"{getattr(e, 'prog', 'openjamba')}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `openjamba presets | head -1`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
