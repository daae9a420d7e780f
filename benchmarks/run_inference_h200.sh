#!/usr/bin/env bash
# The inference benchmark set on one GPU, each part under its own time limit (about 6-8 minutes in all).
# Results: benchmarks/results/<name>.{json,png}
set -u
cd "$(dirname "$0")/.."
status=0
run() { echo "== openjamba bench $*"; python -m openjamba.bench_cli bench "$@" || status=1; }
run decode   --max-seconds 120   # Jamba / Transformer / Mamba, 1K..1M context, batch 1 and max (CUDA graph)
run memory   --max-seconds 40    # cache memory measured vs `openjamba memory`
run prefill  --max-seconds 100   # 1M-token prefill + 128 decoded tokens, jamba-1b
run compare  --max-seconds 60    # vs transformers generate, prompt 512 + 128 new, batch 1 and 16
run passkey  --max-seconds 60    # constructed passkey at 16K, 128K, 1M
# torch.compile'd step inside the graph: fewer kernels per token (the batch-1 bandwidth target needs it)
run compare  --compile --max-seconds 90 --name versus_transformers_compiled
run decode   --compile --variants jamba --batches 1 --contexts 1K,32K,128K --max-seconds 90 --name decode_compiled
exit $status
