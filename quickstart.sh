#!/usr/bin/env bash
# Sets up ./.venv (PyTorch, openjamba and its test extras) and runs the main job: `openjamba quickstart`.
#   bash quickstart.sh               set up, then train a small hybrid on this machine's Python sources
#   bash quickstart.sh --setup-only  set up only (what CI does before running the tests)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# A CPU build of PyTorch is enough to train the quick start and run the tests; an existing torch is kept.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
exec .venv/bin/openjamba quickstart "$@"
