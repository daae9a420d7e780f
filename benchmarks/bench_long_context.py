"""Runs `openjamba bench prefill` (see docs/inference.md).

    python benchmarks/bench_long_context.py [--quick] [options]     # --help lists them
"""

import sys

from openjamba.bench_cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "prefill", *sys.argv[1:]]))
