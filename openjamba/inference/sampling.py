"""Token sampling that stays on the device: no `.item()`, no host-side branching on tensor values.

A categorical draw from `probs` is done as `argmax(probs / q)` with q ~ Exponential(1) per entry (the
exponential race: the entry whose exponential clock, scaled by its rate, rings first wins with probability
proportional to its rate). It needs only elementwise ops and an argmax, so it is as cheap as greedy and
never synchronises. top-k and top-p are masks applied to the logits before the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


@dataclass
class SamplingParams:
    """temperature 0 = greedy; top_k >= 1 or None; top_p in (0, 1] or None."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: (B, V) fp32."""
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens ranked above it already hold top_p of the mass, so the most
        # likely token always survives.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _exponential_like(probs: torch.Tensor, generators) -> torch.Tensor:
    tiny = torch.finfo(probs.dtype).tiny  # keeps probs / q finite
    if isinstance(generators, list):
        rows = [torch.empty_like(probs[b:b + 1]).exponential_(1, generator=g) for b, g in enumerate(generators)]
        return torch.cat(rows).clamp_(min=tiny)
    return torch.empty_like(probs).exponential_(1, generator=generators).clamp_(min=tiny)


def sample(logits: torch.Tensor, params: SamplingParams, generators=None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) long, on the logits' device, without a host sync."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)  # (B, V)
    return (probs / _exponential_like(probs, generators)).argmax(dim=-1)
