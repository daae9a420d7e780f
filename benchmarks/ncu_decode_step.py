"""Hardware counters of the fused decode step's kernels (Nsight Compute): one eager step at batch 1.

    python benchmarks/ncu_decode_step.py                  # jamba-1b, bf16, context 1K, every kernel of one step
    python benchmarks/ncu_decode_step.py --kernels 20     # the first 20 launches only

Runs itself under `ncu` (from the PATH, or --ncu) with the clocks left alone, which replays each kernel of
one step on its own: the kernels do not overlap as in the step's PDL chain, and each starts with its caches
flushed, so a kernel's duration here is longer than its share of a graph replay (bench_decode_step.py and
trace_decode_step.py time those). What it gives per launch: duration, DRAM bytes and throughput, registers per
thread, theoretical and achieved occupancy, warp instructions, issue-slot activity, cycles per issued
instruction and the largest stall reasons (cycles per issued instruction spent in each). Writes
benchmarks/results/decode_step_ncu_<gpu>.json (or --out). Needs CUDA and an ncu that can read the counters.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

STALLS = ("long_scoreboard", "short_scoreboard", "barrier", "wait", "lg_throttle", "mio_throttle", "membar",
          "math_pipe_throttle", "not_selected", "no_instruction", "drain", "dispatch_stall", "branch_resolving",
          "imc_miss", "sleeping")
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats", "ComputeWorkloadAnalysis")
# summary field -> raw metric names that hold it, the first present is taken
FIELDS = {
    "duration_ns": ("gpu__time_duration.sum",),
    "dram_bytes": ("dram__bytes_read.sum",),
    "dram_pct_of_peak": ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
                         "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    "grid": ("launch__grid_size",),
    "registers": ("launch__registers_per_thread",),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct",),
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
    "warp_instructions": ("smsp__inst_executed.sum", "sm__inst_executed.sum"),
    "issue_active_pct": ("smsp__issue_active.avg.pct_of_peak_sustained_active",
                         "sm__instruction_throughput.avg.pct_of_peak_sustained_active"),
    "cycles_per_issued_instruction": ("smsp__average_warp_latency_per_inst_issued.ratio",),
}
EXTRA_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
                 "smsp__inst_executed.sum")


def _number(text: str):
    """An ncu CSV value as a number where it is one ("2,880" -> 2880.0), else the text."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def parse_raw_csv(text: str) -> list[dict]:
    """ncu's `--csv --page raw` output (after any lines of its own and of the profiled program): one dict per
    profiled launch, raw metric name -> value (numbers as floats), without the device attributes."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        raise ValueError("no ncu CSV table in the output (did ncu profile any kernel?)")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, body = rows[0], rows[2:]  # rows[1] holds the units
    out = []
    for r in body:
        if len(r) != len(header):
            continue
        out.append({k: _number(v) for k, v in zip(header, r) if not k.startswith("device__attribute")})
    return out


def summarize(raw: dict, top: int = 4) -> dict:
    """One launch's raw metrics -> the fields above (None where ncu gave none) and its `top` largest stalls."""
    s = {"kernel": str(raw.get("Kernel Name", "?")).split("(")[0]}
    for field, names in FIELDS.items():
        s[field] = next((raw[n] for n in names if isinstance(raw.get(n), float)), None)
    stalls = {r: raw.get(STALL_METRIC.format(r)) for r in STALLS}
    s["stalls"] = dict(sorted(((r, v) for r, v in stalls.items() if isinstance(v, float)), key=lambda kv: -kv[1])[:top])
    return s


def one_step(preset: str, context: int) -> None:
    """Warm up, then one fused step between cudaProfilerStart and cudaProfilerStop (what ncu profiles)."""
    import torch

    from bench_decode_step import _at_context
    from openjamba.bench.common import build_model
    from openjamba.config import JambaConfig
    from openjamba.inference import FusedDecodeStep

    model = build_model(JambaConfig.from_name(preset), "cuda", torch.bfloat16)
    step = FusedDecodeStep(model, 1)
    cache = model.new_cache(1, 2 * context)
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        for _ in range(3):  # Triton compilation
            _at_context(cache, context)
            step(model, tok, cache)
        _at_context(cache, context)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        step(model, tok, cache)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-1b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--kernels", type=int, default=0, help="profile the first N launches of the step (0: all)")
    p.add_argument("--ncu", default=None, help="the ncu executable (default: from the PATH)")
    p.add_argument("--out", default=None)
    p.add_argument("--one-step", action="store_true", help=argparse.SUPPRESS)  # the run ncu profiles
    args = p.parse_args(argv)
    if args.one_step:
        one_step(args.preset, args.context)
        return 0
    ncu = args.ncu or shutil.which("ncu")
    if not ncu:
        raise SystemExit("ncu_decode_step needs Nsight Compute: no `ncu` on the PATH (give --ncu)")
    metrics = ",".join([STALL_METRIC.format(r) for r in STALLS] + list(EXTRA_METRICS))
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw",
           "--print-units", "base", "--metrics", metrics]
    for s in SECTIONS:
        cmd += ["--section", s]
    if args.kernels:
        cmd += ["--launch-count", str(args.kernels)]
    cmd += [sys.executable, os.path.abspath(__file__), "--one-step", "--preset", args.preset,
            "--context", str(args.context)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"ncu failed (exit {run.returncode}):\n{run.stderr[-3000:]}\n{run.stdout[-2000:]}")
    launches = parse_raw_csv(run.stdout)
    rows = [summarize(r) for r in launches]
    from openjamba.bench.common import machine

    info = machine()
    for i, s in enumerate(rows):
        def f(key, fmt):
            return "-" if s[key] is None else format(s[key], fmt)

        print(f"{i:3d} {s['kernel'][:24]:<24} {f('duration_ns', '7.0f')} ns  DRAM {f('dram_bytes', '11.0f')} B "
              f"{f('dram_pct_of_peak', '5.1f')}%  regs {f('registers', '3.0f')}  occupancy "
              f"{f('theoretical_occupancy_pct', '4.1f')}/{f('achieved_occupancy_pct', '4.1f')}%  "
              f"CPI {f('cycles_per_issued_instruction', '5.2f')}  "
              + " ".join(f"{k}={v:.2f}" for k, v in s["stalls"].items()), flush=True)
    out = args.out or os.path.join("benchmarks", "results",
                                   f"decode_step_ncu_{info.get('gpu', 'gpu').split()[-1].lower()}.json")
    with open(out, "w") as fh:
        json.dump(dict(benchmark="fused decode step: Nsight Compute counters per launch (each replayed alone)",
                       preset=args.preset, context=args.context, batch=1, dtype="bfloat16", machine=info,
                       ncu=subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip()
                       .splitlines()[-1:], launches=rows), fh, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
