"""GPU demo: train the jamba-100m preset on the Python sources of this machine for a fixed time budget.

    python benchmarks/train_demo_gpu.py                       # 4000 steps or 7.5 minutes
    python benchmarks/train_demo_gpu.py --steps 8400 --max-seconds 600 --max-mb 400   # 10 minutes
    python benchmarks/train_demo_gpu.py --steps 8400 --max-seconds 600 --max-mb 400 --segment-seconds 520
    python benchmarks/train_demo_gpu.py --steps 8400 --max-seconds 600 --max-mb 400 --resume
                                  # the same 10 minutes in two processes: the second resumes the first's
                                  # checkpoint (exact resume) and trains the time that is left
    python benchmarks/train_demo_gpu.py --preset jamba-10m --max-mb 1 --steps 20 --seq 64 --batch 4 \
        --max-seconds 60 --device cpu                         # smoke test

Corpus: every .py file of the standard library and of site-packages (torch, triton, numpy ... are real
code present on any training machine), up to --max-mb. A byte-level BPE tokenizer of the preset's vocabulary
is trained on a deterministic sample of the files, the files are tokenised into shards (0.5% held out),
and `openjamba.train.trainer.train` runs with validation every --eval-interval steps. --max-seconds is the
training time of the whole run; --segment-seconds stops this process earlier with a checkpoint, and --resume
continues from it (the corpus is prepared once), so a run can outlast a limit on one process. Writes
benchmarks/results/train_demo_<preset>.json (validation loss vs steps, tokens/s, MFU, a sample) and
train_demo_<preset>.png (the loss curves; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def python_sources(max_bytes: int) -> list[str]:
    """Sorted .py files of the standard library then site-packages, up to max_bytes in total."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"]]
    files, seen, total = [], set(), 0
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            dirs.sort()
            if root == paths["stdlib"] and dirpath.startswith(paths["purelib"]):
                continue
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                if not name.endswith(".py") or path in seen:
                    continue
                size = os.path.getsize(path)
                if size > 2_000_000:  # generated tables, not code
                    continue
                seen.add(path)
                files.append(path)
                total += size
                if total >= max_bytes:
                    return files
    return files


def plot(records: list[dict], path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib); the JSON has the numbers")
        return None
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    val = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-100m")
    p.add_argument("--max-seconds", type=float, default=450,
                   help="training time of the whole run, over all its segments (default 450)")
    p.add_argument("--segment-seconds", type=float, default=0,
                   help="stop this process after this much training (with a checkpoint); 0 = the time left")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --work: its corpus, checkpoint, metrics and time spent")
    p.add_argument("--steps", type=int, default=4000,
                   help="cosine schedule length (training stops earlier at --max-seconds)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--max-mb", type=float, default=200, help="corpus size cap")
    p.add_argument("--tokenizer-mb", type=float, default=24, help="text used to train the tokenizer")
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "autocast", "bf16", "fp32"],
                   help="auto = bf16 autocast with fp32 weights on GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default="runs/train_demo", help="data, checkpoints and the HF export go here")
    args = p.parse_args(argv)

    from openjamba.config import JambaConfig
    from openjamba.train.config import TrainConfig
    from openjamba.train.checkpointing import write_json_atomic
    from openjamba.train.data import iter_texts, prepare, read_index
    from openjamba.train.metrics import read_metrics
    from openjamba.train.tokenizer import train_tokenizer
    from openjamba.train.trainer import train

    t0 = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    tok_path = os.path.join(args.work, "tokenizer.json")
    data = os.path.join(args.work, "data")
    out_dir = os.path.join(args.work, "run")
    segments_path = os.path.join(args.work, "segments.json")  # the run's processes so far
    files = python_sources(int(args.max_mb * 1e6))
    size = sum(os.path.getsize(f) for f in files)
    if args.resume:
        if not os.path.exists(segments_path):
            print(f"--resume: {args.work} holds no run to continue (no segments.json); start one without --resume",
                  file=sys.stderr)
            return 2
        with open(segments_path) as f:
            segments = json.load(f)
        index = read_index(data)
        prep_s = segments[0]["prepare_seconds"]
        print(f"resuming the run in {args.work}: {len(segments)} segment(s), "
              f"{sum(s['train_seconds'] for s in segments):.0f} s trained")
    else:
        print(f"corpus: {len(files)} files, {size / 1e6:.0f} MB")
        vocab = JambaConfig.from_name(args.preset).vocab_size
        stride = max(1, round(size / (args.tokenizer_mb * 1e6)))
        sample = files[::stride]
        train_tokenizer(iter_texts(sample), vocab, length=len(sample)).save(tok_path)
        index = prepare(files, tok_path, data, val_fraction=0.005, seed=0, workers=min(16, os.cpu_count() or 1))
        prep_s = time.perf_counter() - t0
        print(f"tokenizer + shards: {prep_s:.0f} s; {index['splits']['train']['tokens']:,} train tokens")
        segments = []
        if os.path.isdir(out_dir):  # a new run: an earlier run's checkpoints must not be resumed into it
            shutil.rmtree(out_dir)
    left = args.max_seconds - sum(s["train_seconds"] for s in segments)
    if left <= 0:
        print(f"the run's {args.max_seconds:.0f} s are spent", file=sys.stderr)
        return 2
    budget = min(left, args.segment_seconds) if args.segment_seconds > 0 else left
    final = budget >= left  # the last segment exports the model and writes the results

    cfg = TrainConfig()
    cfg.model.preset = args.preset
    cfg.data.train, cfg.data.seq_len, cfg.data.batch_size = data, args.seq, args.batch
    cfg.optim.lr, cfg.optim.warmup_steps = args.lr, min(200, args.steps // 10)
    cfg.train.out_dir = out_dir
    cfg.train.max_steps, cfg.train.max_seconds, cfg.train.export = args.steps, budget, final
    cfg.train.device, cfg.train.compile, cfg.train.precision = args.device, args.compile, args.precision
    cfg.train.sample_prompt, cfg.train.sample_tokens = "import torch\n\n\ndef ", 120
    cfg.eval.interval, cfg.eval.steps = args.eval_interval, 20
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = 0, 1
    cfg.log.interval = 10
    summary = train(cfg, resume=args.resume)
    segments.append({"prepare_seconds": prep_s, "train_seconds": summary["seconds"], "steps": summary["steps"],
                     "stop_reason": summary["stop_reason"]})
    write_json_atomic(segments_path, segments)
    train_s = sum(s["train_seconds"] for s in segments)
    if not final:
        print(f"\nsegment {len(segments)}: step {summary['steps']} after {train_s:.0f} s of training; "
              f"{args.max_seconds - train_s:.0f} s left: continue with --resume")
        return 0
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    train_recs = [r for r in records if r["split"] == "train"]
    val_losses = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
    steady = train_recs[len(train_recs) // 4:] or train_recs  # past warm-up / compilation
    tps = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    mfus = sorted(r.get("mfu", 0.0) for r in steady)
    device = "cuda" if torch.cuda.is_available() and args.device in ("auto", "cuda") else "cpu"
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    counts = JambaConfig.from_name(args.preset).param_counts()
    title = (f"{args.preset} ({counts['total'] / 1e6:.0f}M / {counts['active'] / 1e6:.0f}M active), "
             f"{summary['steps']} steps x {args.batch}x{args.seq} tokens in {train_s:.0f} s, {machine}")
    os.makedirs(RESULTS, exist_ok=True)
    png = plot(records, os.path.join(RESULTS, f"train_demo_{args.preset}.png"), title)
    result = {
        "machine": machine, "torch": torch.__version__, "preset": args.preset, "params": counts,
        "corpus_files": len(files), "corpus_mb": size / 1e6,
        "train_tokens_in_corpus": index["splits"]["train"]["tokens"],
        "batch": args.batch, "seq_len": args.seq, "lr": args.lr, "compile": args.compile, "precision": args.precision,
        "prepare_seconds": prep_s, "train_seconds": train_s, "segments": segments, "steps": summary["steps"],
        "tokens": summary["tokens"], "median_tokens_per_s": tps, "median_mfu_vs_989": mfus[len(mfus) // 2],
        "first_loss": train_recs[0]["loss"], "last_loss": train_recs[-1]["loss"],
        "val_loss_vs_step": val_losses, "sample": summary.get("sample"), "png": os.path.basename(png) if png else None,
        "peak_mem_gb": train_recs[-1].get("peak_mem_gb"),
    }
    out = os.path.join(RESULTS, f"train_demo_{args.preset}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{summary['steps']} steps in {train_s:.0f} s ({len(segments)} segment(s)), median {tps / 1e3:.0f}K "
          f"tokens/s; loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}")
    for step, loss in val_losses:
        print(f"  step {step:>6}: validation loss {loss:.4f}")
    print(f"sample:\n{summary.get('sample')}\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
