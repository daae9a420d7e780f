"""Autoregressive generation with the preallocated hybrid cache.

The loop is split the way a CUDA-graph decoder needs it (gpt-fast style):

    prefill(model, prompt, mask, cache, sampler)       -> first new token (B,)
    decode_one_token(model, token, cache, sampler)     -> next token (B,)   fixed shapes: the step to capture
    decode_n_tokens(...)                               -> iterator over steps, EOS bookkeeping on the device

Sampling never leaves the device: a categorical draw is `argmax(probs / q)` with q ~ Exponential(1)
(equivalent to sampling from `probs`), top-k / top-p are masks, and finished rows are tracked in a bool
tensor. Once decoding has started, the only device-to-host reads are the early-stop test `finished.all()`
(every few steps on CUDA, every step on CPU where it costs nothing) and the final trim; argument checks
read the prompt once before the prefill.

Left padding: a batch of prompts of different lengths is padded on the left and described by
`attention_mask` (1 = token, 0 = padding). The model keeps padding out of the Mamba state and the
attention, so each row generates exactly what it would alone (greedy; and sampling too when each row
gets its own seed, `seed=[s0, s1, ...]`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# How often (in steps) `generate` asks the device whether every row has finished, per device type. Each
# ask is a host sync, which stalls a GPU pipeline; on the CPU it is free (the default, 1, for any device
# not listed). Extra steps run after the last EOS are trimmed, so the result does not depend on this.
EOS_CHECK_EVERY = {"cuda": 16}


# ---------------------------------------------------------------------------------------------- sampling
def check_sampling(temperature, top_k, top_p) -> None:
    """Raise a ValueError naming the sampling argument that is out of range."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: (B, V) fp32."""
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def exponential_noise(probs: torch.Tensor, generators) -> torch.Tensor:
    """Exponential(1) noise shaped like probs, clamped away from 0 so probs / q stays finite. `generators`:
    None (global RNG), one torch.Generator, or one per row (a row's draw then ignores its batch-mates)."""
    tiny = torch.finfo(probs.dtype).tiny
    if isinstance(generators, list):
        rows = [torch.empty_like(probs[b:b + 1]).exponential_(1, generator=g) for b, g in enumerate(generators)]
        return torch.cat(rows).clamp_(min=tiny)
    return torch.empty_like(probs).exponential_(1, generator=generators).clamp_(min=tiny)


def draw(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
         generators=None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy at temperature 0, else a categorical draw from the filtered
    softmax as argmax(probs / q), q ~ Exponential(1): elementwise ops and an argmax, no host sync."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)  # (B, V)
    return probs.div_(exponential_noise(probs, generators)).argmax(dim=-1)


@dataclass
class Sampler:
    """Turns last-position logits (B, V) into tokens (B,) without a device-to-host sync (see `draw`).

    temperature 0 is greedy; otherwise logits / temperature, then top-k, then top-p (nucleus) filtering,
    then a categorical draw. `generators` is None (global RNG), one torch.Generator for the whole batch,
    or a list with one generator per row (rows then sample independently of their batch-mates).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generators: torch.Generator | list[torch.Generator] | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return draw(logits, self.temperature, self.top_k, self.top_p, self.generators)

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: (B, V) fp32."""
        return filter_logits(logits, self.top_k, self.top_p)


# ---------------------------------------------------------------------------------------------- steps
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache, sampler: Sampler):
    """Run the whole prompt (B, T) through the model into `cache`; return the first new token (B,)."""
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, num_logits_to_keep=1).logits
    return sampler(logits[:, -1])


def decode_one_token(model, token: torch.Tensor, cache, sampler: Sampler) -> torch.Tensor:
    """One decoding step: token (B,) -> next token (B,). Shapes never change between steps, so this is
    the function to compile / capture in a CUDA graph. No mask is passed: the cache already holds the
    prompt's padding mask and every new position is a real token."""
    logits = model(token[:, None], cache=cache).logits  # (B, 1, V)
    return sampler(logits[:, -1])


def decode_n_tokens(model, input_ids, attention_mask, cache, sampler: Sampler, max_new_tokens: int,
                    eos_ids: torch.Tensor | None, pad_token_id: int,
                    check_every: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (token (B,), finished (B,) bool) for each step, up to `max_new_tokens` steps.

    Rows that produced an EOS earlier get `pad_token_id` from then on (the EOS itself is kept). Iteration
    stops once every row has finished; that is checked on the host every `check_every` steps, so up to
    `check_every - 1` trailing all-padding steps may be yielded (callers that care trim them).
    """
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    token = None
    for step in range(max_new_tokens):
        # Grad mode is set per step rather than around the loop: a context held across `yield` would leak
        # into the caller's code between steps. no_grad rather than inference_mode, so that the tokens
        # handed out are ordinary tensors (inference tensors cannot be saved for backward, which would
        # break e.g. training on generated samples).
        with torch.no_grad():
            if step == 0:
                token = prefill(model, input_ids, attention_mask, cache, sampler)
            else:
                token = decode_one_token(model, token, cache, sampler)
            if eos_ids is not None:
                token = token.masked_fill(finished, pad_token_id)
                finished = finished | torch.isin(token, eos_ids)
        yield token, finished
        if eos_ids is not None and (step + 1) % check_every == 0 and bool(finished.all()):
            return


# ---------------------------------------------------------------------------------------------- public API
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             seed: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Generate continuations of a (left-padded) batch of prompts.

    Args:
        input_ids: (B, T) prompt token ids, padded on the LEFT when rows differ in length.
        attention_mask: (B, T), 1 for tokens and 0 for padding; None when nothing is padding.
        max_new_tokens: the most tokens to add per row (> 0).
        temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
        top_k: keep the k most likely tokens (>= 1; 1 is greedy). top_p: nucleus filter in (0, 1].
        eos_token_id: an id or list of ids that end a row; None never stops early.
        seed: an int seeds one generator for the batch; a list of B ints seeds one generator per row, so a
            row samples the same tokens in any batch as it does alone. None uses the global RNG.
        pad_token_id: fills a row after its EOS (default: config.pad_token_id, else the first EOS id, else 0).

    Returns:
        (B, T + n) long tensor: the prompt (as given) followed by the n <= max_new_tokens new tokens;
        n < max_new_tokens only when every row produced an EOS.
    """
    args = _prepare(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                    eos_token_id, seed, pad_token_id)
    check_every = EOS_CHECK_EVERY.get(args["input_ids"].device.type, 1)
    tokens, finished_steps = [], []
    for token, finished in decode_n_tokens(model, **args, check_every=check_every):
        tokens.append(token)
        finished_steps.append(finished)
    new = torch.stack(tokens, dim=1)  # (B, n)
    if args["eos_ids"] is not None and len(tokens) > 1:
        # Drop the trailing steps in which every row was already finished (one host sync, at the end).
        done = torch.stack(finished_steps, dim=1).all(dim=0)  # (n,) every row finished by step i
        first_all_done = int(done.int().argmax()) if bool(done.any()) else len(tokens) - 1
        new = new[:, :first_all_done + 1]
    return torch.cat([args["input_ids"], new], dim=1)


def stream(model, input_ids, attention_mask=None, max_new_tokens: int = 32, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
           seed: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Like `generate`, but yields each step's new tokens (B,) as soon as they are sampled.

    Arguments are validated when this is called, not on the first `next()`. Finished rows yield
    `pad_token_id`; the stream ends after `max_new_tokens` steps or once every row has produced an EOS.
    """
    args = _prepare(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                    eos_token_id, seed, pad_token_id)
    return (token for token, _ in decode_n_tokens(model, **args, check_every=1))


# ---------------------------------------------------------------------------------------------- validation
def check_generate_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                        seed, pad_token_id) -> dict:
    """Check every argument of `generate` (with a message naming it). Returns the prompt as long ids on the
    model's device, the left-padding mask (long) or None, max_new_tokens, the EOS ids tensor or None, the
    pad id and the random generators."""
    config, device = model.config, model.device
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, prompt_length), got shape {tuple(input_ids.shape)}"
                         + (" (use input_ids[None] for a single prompt)" if input_ids.dim() == 1 else ""))
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; "
                         "generation needs at least one token per row")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {config.vocab_size}) (the vocabulary), found {lo if lo < 0 else hi}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        attention_mask = _check_mask(attention_mask, input_ids.shape, device)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)

    eos_list = _as_id_list(eos_token_id, "eos_token_id", config.vocab_size)
    eos_ids = torch.tensor(eos_list, device=device, dtype=torch.long) if eos_list else None
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_list[0] if eos_list else 0)
    _as_id_list(pad_token_id, "pad_token_id", config.vocab_size)

    return dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                pad_token_id=int(pad_token_id), generators=make_generators(seed, B, device))


def _prepare(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
             pad_token_id) -> dict:
    """Check every argument, then build the cache and the sampler."""
    args = check_generate_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                               eos_token_id, seed, pad_token_id)
    B, T = args["input_ids"].shape
    sampler = Sampler(float(temperature), top_k, None if top_p is None else float(top_p), args.pop("generators"))
    return dict(args, sampler=sampler, cache=model.new_cache(B, T + max_new_tokens))


def _check_mask(attention_mask, shape, device) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(shape)}")
    mask = attention_mask.to(device).bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("every row needs a real last token: pad prompts on the LEFT (attention_mask 0s first)")
    if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
        raise ValueError("attention_mask must be left padding only: 0s (padding) then 1s (tokens) in each row")
    return mask.long()


def _as_id_list(ids, name: str, vocab_size: int) -> list[int]:
    if ids is None:
        return []
    items = [ids] if isinstance(ids, int) else list(ids)
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {ids!r}")
    return items


def make_generators(seed, batch_size: int, device) -> torch.Generator | list[torch.Generator] | None:
    """None -> global RNG; an int -> one generator for the batch; a list of `batch_size` ints -> one
    generator per row, so a row draws the same tokens whatever its batch-mates are."""
    if seed is None:
        return None
    if isinstance(seed, int) and not isinstance(seed, bool):
        return torch.Generator(device=device).manual_seed(seed)
    seeds = list(seed) if isinstance(seed, Sequence) else None
    if seeds is None or len(seeds) != batch_size or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise ValueError(f"seed must be an int or a list of {batch_size} ints (one per row), got {seed!r}")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]
