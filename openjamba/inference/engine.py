"""Generator: chunked prefill + a one-token decode step replayed from a CUDA graph.

    gen = Generator(model, batch_size=4, max_length=4096)      # plans memory, allocates the cache, captures
    logits = gen.prefill(ids, mask, chunk_size=2048)            # (B, V) at the last prompt position
    tok = sample(logits, params)                                # on the device
    logits = gen.decode_one_token(tok)                          # (B, V), fixed shapes
    new = gen.decode_n_tokens(tok, 100, params)                 # (B, 100) tokens after `tok`

Modes:
  "eager"  - the model's own forward with python-int cache positions (the reference path; CPU default).
  "static" - the static step of step.py run op by op: device-tensor position, attention over the whole
             cache. Runs anywhere; on the CPU it is how the graph path's maths is tested.
  "graph"  - the static step captured once in a torch.cuda.CUDAGraph and replayed per token: one launch per
             step instead of hundreds (the CUDA default).
Steps (what "static" and "graph" run; `step=`):
  "static"   - step.py's decode_step, layer by layer as the model's modules compute (any device).
  "compiled" - the same through torch.compile (Inductor fuses its elementwise ops; the first call compiles).
  "fused"    - fused.py's FusedDecodeStep: Triton kernels that fold the norms, routing and gates into the
               matmuls, 5 or 6 kernels per Mamba layer (CUDA).
  "auto"     - "fused" where it can run, moe_impl is "auto" and fused.fused_preferred says so (up to 256 rows,
               and past them where the attention cache is long enough), else "static".
The host only enqueues work: sampling is on the device and the EOS test reads back once every
`check_every` steps.
Greedy decoding (`decode_n_tokens` at temperature 0) runs in blocks of `chain` tokens (CHAIN by default): each
step ends in the argmax and feeds the token back on the device, so in graph mode one replay decodes a whole
block, and with the fused step the argmax, the next token's embedding, the position and the accumulators' reset
are one kernel (fused_kernels.next_token_kernel) in the steps' chain of kernels: no launch between two tokens
that is not the step's own, where the one-token graph left an argmax, a copy, the embedding, a memset and
the position's add, and a graph launch, per token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .. import ops
from .planner import DEFAULT_CHUNK, MemoryPlan, device_budget, plan_memory
from ..generation import EOS_CHECK_EVERY, check_generate_args
from .sampling import SamplingParams, sample
from .fused import FusedDecodeStep, fused_preferred, fused_unavailable
from .step import decode_step, resolve_moe_impl

logger = logging.getLogger("openjamba.inference")

MODES = ("auto", "eager", "static", "graph")
CHAIN = 16  # tokens per block of greedy decoding (one graph replay in graph mode)
STEPS = ("auto", "static", "compiled", "fused")
_compiled_step = None


def compiled_decode_step():
    """One torch.compile wrapper shared by every Generator, so dynamo's cache is shared too: after a second
    cache size it marks that size dynamic and later Generators reuse the code instead of recompiling."""
    global _compiled_step
    if _compiled_step is None:
        ops.load_kernels()  # an import reached while Dynamo traces the step would split its graph
        _compiled_step = torch.compile(decode_step)
    return _compiled_step


def capture_step(step, model, token: torch.Tensor, cache, moe_impl):
    """Capture one decode step `step(model, token, cache, moe_impl)` in a CUDA graph; returns (graph, logits
    buffer). Three warm-up steps run first on a side stream (cuBLAS handles, Triton compilation), so they
    advance the cache: reset or reposition it before replaying."""
    device = token.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            step(model, token, cache, moe_impl)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        logits = step(model, token, cache, moe_impl)
    return graph, logits


class Generator:
    """Owns one HybridCache and the decode step for a fixed (batch_size, max_length)."""

    def __init__(self, model, batch_size: int, max_length: int, mode: str = "auto", moe_impl: str = "auto",
                 chunk_size: int | None = None, budget: int | None = None, check_memory: bool = True,
                 step: str = "auto", chain: int = CHAIN):
        """chain: tokens per block of greedy decoding (see the module docstring); 0 decodes greedy tokens one
        step at a time, as every sampling setting does."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; choose one of {STEPS}")
        self.model, self.device, self.dtype = model, model.device, model.dtype
        if mode == "auto":
            mode = "graph" if self.device.type == "cuda" else "eager"
        if mode == "graph" and self.device.type != "cuda":
            raise RuntimeError(f"mode 'graph' needs the model on a CUDA device (it is on {self.device}); "
                               "use mode 'static' or 'eager'")
        if step not in ("auto", "static") and mode == "eager":
            raise ValueError(f"step {step!r} replaces the static step: use mode 'static' or 'graph'")
        if isinstance(chain, bool) or not isinstance(chain, int) or chain < 0:
            raise ValueError(f"chain must be an int >= 0 (tokens per block of greedy decoding), got {chain!r}")
        self.mode, self.batch_size, self.max_length = mode, batch_size, max_length
        self.chain = chain if mode != "eager" else 0
        # The weights are already resident, so the budget is what the device has free now.
        if budget is None and self.device.type == "cuda":
            budget = device_budget(self.device)
        self.plan: MemoryPlan = plan_memory(model.config, self.dtype, batch_size, max_length, chunk_size,
                                            budget, weights_resident=False)
        self._budget, self._check_memory, self._chunk_given = budget, check_memory, chunk_size is not None
        if check_memory:
            self.plan.check()
        # prefill tokens per row and chunk: as given, else the largest the plan found to fit
        self.chunk_size = chunk_size if chunk_size is not None else self.plan.detail["chunk_size"]
        if chunk_size is None and self.chunk_size < min(DEFAULT_CHUNK, max_length):
            logger.info("Generator: prefill chunk %d tokens per row (%d does not fit at batch %d)", self.chunk_size,
                        min(DEFAULT_CHUNK, max_length), batch_size)
        self.cache = model.new_cache(batch_size, max_length)
        self.step = self._choose_step(step, moe_impl) if mode != "eager" else "eager"
        if self.step == "fused":
            self.moe_impl = "fused"  # the fused kernels route themselves, reading only the routed experts
            self._step = FusedDecodeStep(model, batch_size)
        else:
            self.moe_impl = resolve_moe_impl(moe_impl, self.device, self.dtype) if mode != "eager" else None
            if self.step == "compiled" and moe_impl == "auto" and self.moe_impl == "grouped_mm" \
                    and self.dtype != torch.bfloat16:
                # torch._grouped_mm's shape function (used while compiling) accepts bf16 only, even where the
                # eager CPU fallback runs other dtypes.
                self.moe_impl = "dense"
            # torch.compile fuses the step's many small elementwise ops (norms, gates, the SSM update) into
            # few kernels; the graph then replays those.
            self._step = compiled_decode_step() if self.step == "compiled" else decode_step
        self._token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # graph input
        self._block = torch.zeros(batch_size, max(self.chain, 1), dtype=torch.long, device=self.device)
        self._graph, self._graph_logits, self._chain_graph = None, None, None
        if mode == "graph":
            self._capture_with_fallback()
        split = sorted(getattr(self._step, "split", ()))
        logger.info("Generator: mode %s, step %s%s%s, batch %d, max_length %d, MoE %s", mode, self.step,
                    " (programmatic dependent launch)" if getattr(self._step, "pdl", False) else "",
                    f" (split layers: {', '.join(split)})" if split else "", batch_size, max_length, self.moe_impl)

    def _choose_step(self, step: str, moe_impl: str) -> str:
        if step == "fused":
            reason = fused_unavailable(self.model, self.batch_size)
            if reason:
                raise RuntimeError(f"step 'fused' was requested but cannot run: {reason}")
            if moe_impl != "auto":
                raise ValueError(f"moe_impl {moe_impl!r} applies to the static and compiled steps; the fused step "
                                 "routes in its own kernels (leave moe_impl='auto')")
            return step
        if step == "auto":
            reason = fused_unavailable(self.model, self.batch_size) if self.device.type == "cuda" else "not CUDA"
            reason = reason or fused_preferred(self.model.config, self.batch_size, self.max_length,
                                               self.model.dtype.itemsize)
            if reason is None and moe_impl == "auto":
                return "fused"
            if self.device.type == "cuda":
                logger.info("decode step: static (fused step not used: %s)",
                            reason or f"moe_impl {moe_impl!r} was asked for")
            return "static"
        return step

    # ------------------------------------------------------------------ CUDA graph
    def _capture(self) -> None:
        self._graph, self._graph_logits = capture_step(self._step, self.model, self._token, self.cache,
                                                       self.moe_impl)
        if self.chain:
            self._capture_chain()
        self.cache.reset()  # the warm-up steps wrote into the state; capture itself ran nothing

    def _capture_chain(self) -> None:
        """The greedy block of `chain` tokens in a graph of its own (sharing the one-token graph's memory pool:
        the two never run at once). One token is run first, on a side stream (Triton compilation)."""
        device = self.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            self._start_block(self._token[:, 0])
            self._greedy_block(1)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._graph.pool()):
            self._greedy_block(self.chain)
        self._chain_graph = graph

    def _capture_with_fallback(self) -> None:
        try:
            self._capture()
        except Exception as e:  # noqa: BLE001 - retried once with the portable MoE routing, then re-raised
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
            if self.moe_impl in ("dense", "fused") or oom:
                raise
            logger.warning("CUDA graph capture with MoE %s failed (%s: %s); retrying with dense",
                           self.moe_impl, type(e).__name__, e)
            torch.cuda.synchronize(self.device)
            self.moe_impl = "dense"
            self._graph = self._chain_graph = None
            self._capture()

    # ------------------------------------------------------------------ steps
    def reset(self) -> None:
        """Empty the cache for a new batch of prompts (the captured graph stays valid)."""
        self.cache.reset()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """Run prompts (B, T) into the cache `chunk_size` tokens at a time; return the last logits (B, V).

        Each chunk continues from the cache (K/V, conv and SSM state), so the result equals one full
        forward while activations scale with the chunk, not the prompt. attention_mask: (B, T), 0 for left
        padding; a padded batch is planned again with its per-chunk mask (a shorter chunk where the chunk
        was chosen, DoesNotFit before any chunk runs where a given one does not fit)."""
        chunk = chunk_size or self.chunk_size
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"this Generator was built for batch {self.batch_size}, got {B} prompts")
        self.cache.check_room(T)
        if attention_mask is not None and not bool(attention_mask.all()):
            chunk = self._padded_chunk(chunk_size)
        logits = None
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            m = None if attention_mask is None else attention_mask[:, s:e]
            logits = self.model(input_ids[:, s:e], attention_mask=m, cache=self.cache, num_logits_to_keep=1).logits
        self.cache.sync_position()
        return logits[:, -1]

    def _padded_chunk(self, chunk_size: int | None) -> int:
        """The prefill chunk for a left-padded batch, which materialises a (batch, chunk, context) mask per
        chunk: planned again with that mask; where the chunk was chosen, the largest that fits it."""
        given = chunk_size or (self.chunk_size if self._chunk_given else None)
        plan = plan_memory(self.model.config, self.dtype, self.batch_size, self.max_length, given, self._budget,
                           padded=True, weights_resident=False)
        if self._check_memory:
            plan.check()
        chunk = given or plan.detail["chunk_size"]
        if given is None and chunk < self.chunk_size:
            logger.info("Generator: prefill chunk %d tokens per row for a left-padded batch (its mask does not fit "
                        "at %d)", chunk, self.chunk_size)
        return chunk

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) at the next position -> logits (B, V). In graph mode the returned tensor is the graph's
        output buffer: read (sample) it before the next step overwrites it."""
        if self.mode == "eager":
            logits = self.model(token.view(-1, 1), cache=self.cache).logits[:, -1]
            self.cache.sync_position()  # keep the device position valid should a static step follow
            return logits
        self.cache.check_room(1)
        self._token.copy_(token.view(-1, 1))
        if self._graph is not None:
            if self.step == "fused":
                self._step.sync_copies()  # weights changed in place since the capture: its transposed copies too
            self._graph.replay()
            logits = self._graph_logits
        else:
            logits = self._step(self.model, self._token, self.cache, self.moe_impl)
        self.cache.advance(1)
        return logits

    # ------------------------------------------------------------------ greedy blocks
    def _start_block(self, token: torch.Tensor) -> None:
        """The input of the next greedy block: token (B,)."""
        if self.step == "fused":
            self._step.start_greedy(self.model, token.view(-1, 1))
        else:
            self._token.copy_(token.view(-1, 1))

    def _greedy_block(self, k: int) -> None:
        """k greedy steps from the input _start_block or the previous block left; their tokens -> _block[:, :k]
        (the cache's host length is the caller's to advance)."""
        for j in range(k):
            if self.step == "fused":
                self._step.greedy_token(self.model, self.cache, self._block[:, j])
            else:
                tok = self._step(self.model, self._token, self.cache, self.moe_impl).argmax(-1)
                self._block[:, j].copy_(tok)
                self._token.copy_(tok.view(-1, 1))

    def _greedy_blocks(self, token, n, out, eos_ids, pad_token_id, check_every, finished, all_done) -> tuple:
        """Greedy decoding of the first whole blocks of n tokens into out; -> (tokens decoded, finished rows,
        whether every row has finished: decoding stops there)."""
        k = self.chain if self._chain_graph is not None else min(self.chain, check_every)
        i = 0
        if self.chain == 0 or n < k or (self._chain_graph is not None and check_every < k):
            return 0, finished, False
        self._start_block(token)
        while n - i >= k:
            self.cache.check_room(k)
            if self._chain_graph is not None:
                if self.step == "fused":
                    self._step.sync_copies()
                self._chain_graph.replay()
            else:
                self._greedy_block(k)
            self.cache.advance(k)
            blk = out[:, i:i + k]
            blk.copy_(self._block[:, :k])
            if eos_ids is not None:  # as the step-by-step loop: pad after a row's EOS (or once it had finished)
                hit = torch.isin(blk, eos_ids)
                before = finished[:, None] | ((hit.cumsum(1) - hit.long()) > 0)  # finished before each column
                blk.masked_fill_(before, pad_token_id)
                done = before | hit
                all_done[i:i + k] = done.all(0)
                finished = done[:, -1]
            i += k
            if eos_ids is not None and bool(finished.all()):
                return i, finished, True
        return i, finished, False

    @torch.inference_mode()
    def decode_n_tokens(self, token: torch.Tensor, n: int, params: SamplingParams | None = None, generators=None,
                        eos_ids: torch.Tensor | None = None, pad_token_id: int = 0, check_every: int = 16,
                        finished: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `token` (B,) and the tokens sampled after it; return the n new tokens (B, n').

        With eos_ids, a row that produced an EOS (or is already `finished`) gets pad_token_id from then on,
        and decoding stops early once every row has finished; that is read back every `check_every`
        steps, and the trailing all-finished steps are trimmed (one sync at the end), so n' <= n.
        Greedy decoding runs in blocks of `chain` tokens (the module docstring), read back once per block
        (graph mode: where check_every is at least the block; elsewhere blocks of at most check_every)."""
        params = params or SamplingParams(0.0)
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1 (steps between EOS read-backs), got {check_every!r}")
        B = token.shape[0]
        out = torch.empty(B, n, dtype=torch.long, device=self.device)
        if finished is None:
            finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        all_done = torch.zeros(n, dtype=torch.bool, device=self.device)  # every row finished by step i
        steps = n
        first, stopped = 0, False
        if params.greedy:
            first, finished, stopped = self._greedy_blocks(token, n, out, eos_ids, pad_token_id, check_every,
                                                           finished, all_done)
            if first:
                token = out[:, first - 1]
            if stopped:
                steps = first
        for i in range(first, 0 if stopped else n):
            token = sample(self.decode_one_token(token), params, generators)
            if eos_ids is not None:
                token = token.masked_fill(finished, pad_token_id)
                finished = finished | torch.isin(token, eos_ids)
                all_done[i] = finished.all()
            out[:, i] = token
            if eos_ids is not None and (i + 1) % check_every == 0 and bool(finished.all()):
                steps = i + 1
                break
        if eos_ids is not None and steps > 0:
            done = all_done[:steps]
            if bool(done.any()):
                steps = int(done.int().argmax()) + 1
        return out[:, :steps]


# ---------------------------------------------------------------------------------------------- generate
_REUSE_ATTR = "_openjamba_fast_generator"


def _generator_for(model, B: int, need: int, mode: str, moe_impl: str, chunk_size: int | None, budget,
                   step: str = "auto") -> Generator:
    """A Generator for (B, >= need positions), reused across calls while shapes and weights allow: capturing
    a graph costs a few steps, so back-to-back generate() calls should not pay it every time. Capacity is
    rounded up to a multiple of 256 so prompts of nearby lengths share one."""
    cap = -(-need // 256) * 256
    key = (B, mode, moe_impl, step, chunk_size, model.lm_head.weight.data_ptr(), model.dtype, str(model.device))
    old = getattr(model, _REUSE_ATTR, None)
    if old is not None and old[0] == key and old[1].max_length >= need and old[1].max_length <= 2 * cap:
        old[1].reset()
        return old[1]
    if old is not None:
        object.__setattr__(model, _REUSE_ATTR, None)  # free the old cache before allocating the new one
        del old
    gen = Generator(model, B, cap, mode=mode, moe_impl=moe_impl, chunk_size=chunk_size, budget=budget, step=step)
    object.__setattr__(model, _REUSE_ATTR, (key, gen))  # not a submodule: keep it out of state_dict
    return gen


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             seed: int | Sequence[int] | None = None, pad_token_id: int | None = None, *, mode: str = "auto",
             moe_impl: str = "auto", chunk_size: int | None = None, budget: int | None = None,
             check_every: int | None = None, step: str = "auto") -> torch.Tensor:
    """Same arguments and result as openjamba.generation.generate, on the fast path.

    Returns (B, T + n): the prompt as given, then n <= max_new_tokens new tokens (n < max_new_tokens only
    when every row produced an EOS). Keyword-only extras: mode ("auto" = CUDA graph on CUDA, eager
    elsewhere), moe_impl, chunk_size (prefill tokens per row and chunk; default the largest up to 8192 that
    fits), budget (bytes; default the device's free memory),
    check_every (steps between EOS read-backs; default 16 on CUDA, 1 elsewhere), step (the decode step:
    "auto", "static", "compiled" or "fused"; see the module docstring).
    """
    args = check_generate_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                               eos_token_id, seed, pad_token_id)
    ids, mask, eos_ids, generators = args["input_ids"], args["attention_mask"], args["eos_ids"], args["generators"]
    params = SamplingParams(temperature, top_k, top_p)
    device, (B, T) = model.device, ids.shape
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: the prefill takes the maskless attention path
    if check_every is None:
        check_every = EOS_CHECK_EVERY.get(device.type, 1)

    gen = _generator_for(model, B, T + max_new_tokens, mode, moe_impl, chunk_size, budget, step)
    first = sample(gen.prefill(ids, mask, chunk_size), params, generators)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if eos_ids is not None:
        finished = torch.isin(first, eos_ids)
    new = [first[:, None]]
    if max_new_tokens > 1 and not (eos_ids is not None and bool(finished.all())):
        new.append(gen.decode_n_tokens(first, max_new_tokens - 1, params, generators, eos_ids, args["pad_token_id"],
                                       check_every, finished))
    return torch.cat([ids, *new], dim=1)
