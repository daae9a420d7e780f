#!/usr/bin/env bash
# The inference benchmark set on one GPU, each part under its own time limit (about 6 minutes in all).
# Results: benchmarks/results/<name>.{json,png}
set -u
cd "$(dirname "$0")/.."
status=0
run() { echo "== openjamba bench $*"; python -m openjamba.bench_cli bench "$@" || status=1; }
run decode   --max-seconds 150   # Jamba / Transformer / Mamba, 1K..1M context, batch 1 and max (CUDA graph)
run memory   --max-seconds 40    # cache memory measured vs `openjamba memory`
run prefill  --max-seconds 100   # 1M-token prefill + 128 decoded tokens, jamba-1b
run compare  --max-seconds 60    # vs transformers generate, prompt 512 + 128 new, batch 1 and 16
run passkey  --max-seconds 60    # constructed passkey at 16K, 128K, 1M
exit $status
