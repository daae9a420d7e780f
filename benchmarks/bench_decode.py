"""Runs `openjamba bench decode` (see docs/inference.md).

    python benchmarks/bench_decode.py [--quick] [options]     # --help lists them
"""

import sys

from openjamba.bench_cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "decode", *sys.argv[1:]]))
