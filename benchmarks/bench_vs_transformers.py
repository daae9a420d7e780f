"""Runs `openjamba bench compare` (see docs/inference.md).

    python benchmarks/bench_vs_transformers.py [--quick] [options]     # --help lists them
"""

import sys

from openjamba.bench_cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "compare", *sys.argv[1:]]))
