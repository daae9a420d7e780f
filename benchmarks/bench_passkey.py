"""Runs `openjamba bench passkey` (see docs/inference.md).

    python benchmarks/bench_passkey.py [--quick] [options]     # --help lists them
"""

import sys

from openjamba.bench_cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "passkey", *sys.argv[1:]]))
