"""Runs `openjamba bench memory` (see docs/inference.md).

    python benchmarks/bench_cache_memory.py [--quick] [options]     # --help lists them
"""

import sys

from openjamba.bench_cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "memory", *sys.argv[1:]]))
