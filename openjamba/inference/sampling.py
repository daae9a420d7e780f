"""Token sampling for the fast path: the same on-device draw as `openjamba.generation` (no `.item()`, no
host-side branching on tensor values), with the sampling settings held in one validated object.

A categorical draw from `probs` is done as `argmax(probs / q)` with q ~ Exponential(1) per entry (the
exponential race: the entry whose exponential clock, scaled by its rate, rings first wins with probability
proportional to its rate). It needs only elementwise ops and an argmax, so it is as cheap as greedy and
never synchronises. top-k and top-p are masks applied to the logits before the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation import check_sampling, draw, filter_logits, make_generators

__all__ = ["SamplingParams", "sample", "filter_logits", "make_generators"]


@dataclass
class SamplingParams:
    """temperature 0 = greedy; top_k >= 1 or None; top_p in (0, 1] or None."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: torch.Tensor, params: SamplingParams, generators=None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) long, on the logits' device, without a host sync."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return draw(logits, params.temperature, params.top_k, params.top_p, generators)
