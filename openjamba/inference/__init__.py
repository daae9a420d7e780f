"""Fast inference: chunked prefill, a CUDA-graph one-token decode step, on-device sampling, memory planning.

`generate` has the signature and result of `openjamba.generation.generate`; `Generator` exposes the steps
(prefill, decode_one_token, decode_n_tokens) for benchmarks and servers; `plan_memory` says before
allocating whether a (config, dtype, batch, context) fits.
"""

from .engine import MODES, STEPS, Generator, generate
from .fused import FusedDecodeStep, fused_unavailable
from .planner import DoesNotFit, MemoryPlan, check_fits, device_budget, max_batch, plan_memory
from .sampling import SamplingParams, filter_logits, make_generators, sample
from .step import MOE_IMPLS, decode_step, moe_forward_static

__all__ = ["Generator", "generate", "MODES", "STEPS", "FusedDecodeStep", "fused_unavailable", "plan_memory",
           "check_fits", "max_batch", "device_budget", "MemoryPlan", "DoesNotFit", "SamplingParams", "sample",
           "filter_logits", "make_generators", "decode_step", "moe_forward_static", "MOE_IMPLS"]
