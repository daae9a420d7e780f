"""Inference benchmarks (decode throughput, cache memory, long context, passkey, vs transformers).

The logic lives here so that `openjamba bench ...` and the scripts in benchmarks/ run the same code."""
