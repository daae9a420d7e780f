"""A per-program timeline of the fused decoding step: when each program of each kernel reached its wait on the
previous kernel, when the wait released it, when it finished, and on which SM it ran.

    python benchmarks/trace_decode_step.py                    # jamba-1b, bf16, batch 1, context 1K
    python benchmarks/trace_decode_step.py --context 131072
    python benchmarks/trace_decode_step.py --tiny-widths      # the same kernels at bench_decode_step.TINY_WIDTHS

The kernels of inference/fused_kernels.py are recompiled from a copy of their source in which
`_after_previous_kernel` also stores the GPU's global timer (%globaltimer: nanoseconds, updated every
~0.25 us on an H200) before and after the wait and the SM id (%smid), and each kernel stores the timer once
more at its end, into a (kernel, program) table. The step is captured in a CUDA graph with PDL as the
Generator runs it, replayed, and the table of one replay is summarised per kernel kind:
  gap   from the previous kernel's last program ending to this kernel's first program passing its wait
  span  from that first release to this kernel's last program ending
  work  per program, from its release to its end (median and max)
  sms   how many SMs its programs ran on
With --tiny-widths the preset's layer schedule runs at widths where its weights are under 2 MB, so each kind's
span there is what it costs without its weight bytes. Writes
benchmarks/results/decode_timeline_<preset>[-tiny]_<context>.json (or --out). Needs CUDA (the timer and SM
id are read with inline PTX).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import tempfile

import torch

from bench_decode_step import TINY_WIDTHS, _ms_per_call  # a sibling script (benchmarks/ is on the path when run)

MAXP = 8192  # programs per kernel the table holds (the jamba-1b lm_head has 8192 at batch 1)
MAXK = 200  # kernels per step

_HELPERS = '''
@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _slot(TR, KSEQ):
    pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
    return TR + (KSEQ * MAXP + pid) * 4


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr, TR, KSEQ):
    s = _slot(TR, KSEQ)
    tl.store(s, _now())
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(s + 1, _now())
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    tl.store(s + 3, sm.to(tl.int64))


@triton.jit
def _trace_end(TR, KSEQ):
    tl.store(_slot(TR, KSEQ) + 2, _now())
'''


def traced_source(src: str) -> str:
    """fused_kernels.py's source with the trace table threaded through every kernel (see the docstring)."""
    wait_def = re.compile(r"@triton.jit\ndef _after_previous_kernel\(PDL: tl.constexpr\):.*?\n\n\n", re.S)
    if len(wait_def.findall(src)) != 1:
        raise RuntimeError("fused_kernels.py no longer defines _after_previous_kernel(PDL) as this tracer expects")
    src = wait_def.sub("", src)
    src = src.replace("_after_previous_kernel(PDL)", "_after_previous_kernel(PDL, TR, KSEQ)")
    src = re.sub(r"(def \w+_kernel\()(.*?)\):\n",
                 lambda m: f"{m.group(1)}{m.group(2).rstrip().rstrip(',')}, TR, KSEQ):\n", src, flags=re.S)
    parts = []
    for part in re.split(r"(?=\n@triton.jit\n)", src):  # the end mark after each kernel's last statement
        if re.search(r"\ndef \w+_kernel\(", part):
            part = part.rstrip("\n") + "\n    _trace_end(TR, KSEQ)\n"
        parts.append(part)
    src = "\n".join(parts)
    anchor = "\n@triton.jit\ndef _dot("
    if anchor not in src:
        raise RuntimeError("fused_kernels.py no longer defines _dot, where the tracer inserts its helpers")
    return src.replace(anchor, f"\nMAXP = tl.constexpr({MAXP})\n" + _HELPERS + anchor, 1)


def traced_kernels():
    """The traced copy of inference/fused_kernels.py as a module (kernels take TR, KSEQ last)."""
    from openjamba.inference import fused_kernels

    path = os.path.join(tempfile.mkdtemp(), "_fused_kernels_traced.py")
    with open(path, "w") as f:
        f.write(traced_source(open(fused_kernels.__file__).read()))
    spec = importlib.util.spec_from_file_location("openjamba.inference._fused_kernels_traced", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Recorder:
    """Stands in for the kernels module: each launch gets the table and its index in the step."""

    def __init__(self, module, table):
        self.module, self.table, self.seq, self.log = module, table, 0, []

    def __getattr__(self, name):
        kernel = getattr(self.module, name)
        if not name.endswith("_kernel"):
            return kernel
        rec = self

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    n = math.prod(grid)
                    if n > MAXP or rec.seq >= MAXK:
                        raise RuntimeError(f"{name}: more programs or kernels than the trace table holds")
                    rec.log.append((name.removesuffix("_kernel"), n))
                    rec.seq += 1
                    return kernel[grid](*args, TR=rec.table, KSEQ=rec.seq - 1, **kwargs)
                return launch
        return Launch()


def trace(model, context: int) -> dict:
    from openjamba.inference import FusedDecodeStep
    from openjamba.inference.engine import capture_step

    class Traced(FusedDecodeStep):
        def __call__(self, *args, **kwargs):
            self.fk.seq, self.fk.log = 0, []
            return super().__call__(*args, **kwargs)

    table = torch.zeros(MAXK * MAXP * 4, dtype=torch.int64, device=model.device)
    step = Traced(model, 1)
    step.fk = _Recorder(traced_kernels(), table)
    cache = model.new_cache(1, context + 256)  # room for the replays below
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    graph, _ = capture_step(step, model, tok, cache, None)

    def replay_ms(g, reps=100):
        cache.length = context
        cache.sync_position()
        return _ms_per_call(g.replay, reps)

    ms_traced = replay_ms(graph)
    cache.length = context
    cache.sync_position()
    table.zero_()
    graph.replay()
    torch.cuda.synchronize()
    plain, _ = capture_step(FusedDecodeStep(model, 1), model, tok, cache, None)
    ms_plain = replay_ms(plain)
    t = table.view(MAXK, MAXP, 4).cpu()
    log = step.fk.log
    origin = int(t[0, :log[0][1], :2].min())
    rows, prev_end = [], None
    for k, (name, n) in enumerate(log):
        x = t[k, :n].double()
        pre, post, end = ((x[:, i] - origin) / 1e3 for i in range(3))  # us
        row = dict(k=k, kernel=name, programs=n, sms=len(set(t[k, :n, 3].tolist())),
                   first_at_wait=pre.min().item(), last_at_wait=pre.max().item(), first_released=post.min().item(),
                   last_released=post.max().item(), last_end=end.max().item(),
                   work_median=(end - post).median().item(), work_max=(end - post).max().item())
        row["gap"] = row["first_released"] - prev_end if prev_end is not None else 0.0
        prev_end = row["last_end"]
        rows.append(row)
    kinds = {}
    for r in rows:
        a = kinds.setdefault(r["kernel"], dict(calls=0, gap_us=0.0, span_us=0.0, work_median_us=0.0,
                                               work_max_us=0.0, sms_min=r["sms"], sms_max=r["sms"]))
        a["calls"] += 1
        a["gap_us"] += r["gap"]
        a["span_us"] += r["last_end"] - r["first_released"]
        a["work_median_us"] += r["work_median"]
        a["work_max_us"] += r["work_max"]
        a["sms_min"], a["sms_max"] = min(a["sms_min"], r["sms"]), max(a["sms_max"], r["sms"])
    for a in kinds.values():
        a["total_us"] = a["gap_us"] + a["span_us"]
        for key in ("gap_us", "span_us", "work_median_us", "work_max_us"):
            a[key] /= a["calls"]
    return dict(context=context, ms_per_token_traced=ms_traced, ms_per_token_plain=ms_plain,
                timeline_us=rows[-1]["last_end"], kernels=len(rows), kinds=kinds, rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="jamba-1b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tiny-widths", action="store_true",
                   help="the preset's layer schedule at bench_decode_step.TINY_WIDTHS (the kernels without the bytes)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("trace_decode_step needs a CUDA GPU (the timer and SM id are read with inline PTX)")
    from openjamba.bench.common import build_model, machine
    from openjamba.config import JambaConfig

    config = JambaConfig.from_name(args.preset, **(TINY_WIDTHS if args.tiny_widths else {}))
    label = args.preset + ("-tiny" if args.tiny_widths else "")
    model = build_model(config, "cuda", torch.bfloat16)
    r = trace(model, args.context)
    print(f"{label} context {args.context}: {r['ms_per_token_plain'] * 1e3:.1f} us per token "
          f"({r['ms_per_token_traced'] * 1e3:.1f} traced), timeline {r['timeline_us']:.1f} us, {r['kernels']} kernels")
    for name, a in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["total_us"]):
        print(f"  {name:<14} x{a['calls']:3d}  gap {a['gap_us']:5.2f}  span {a['span_us']:6.2f}  work median "
              f"{a['work_median_us']:5.2f} max {a['work_max_us']:5.2f}  SMs {a['sms_min']}-{a['sms_max']}  "
              f"total {a['total_us']:6.1f} us")
    out = args.out or os.path.join("benchmarks", "results", f"decode_timeline_{label}_{args.context}.json")
    with open(out, "w") as f:
        json.dump(dict(benchmark="fused decode step: per-program timeline", preset=args.preset, dtype="bfloat16",
                       batch=1, widths=TINY_WIDTHS if args.tiny_widths else None, machine=machine(), **r), f,
                  indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
