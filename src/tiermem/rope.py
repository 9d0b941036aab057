"""Rotary position embeddings computed from the model's own rotary module, at any positions we choose.

Policies decide which positions a token is rotated at (its original index, its slot in the cache, or one fixed
distance for retrieved memory), so tiermem rotates queries and keys itself instead of using the cos/sin tables the
model computed for its own position ids.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., T, D) by the angles in ``cos``/``sin`` (T, D) (HF's half-split layout)."""
    return x * cos + rotate_half(x) * sin


class Rope:
    """cos/sin tables of one RoPE flavour of a model (Gemma3 has one for local and one for global layers).

    ``cos_sin_range`` memoizes its last answer: every layer of one forward asks for the same range.
    """

    def __init__(self, rotary_emb: nn.Module, layer_type: str | None, dtype: torch.dtype):
        self.rotary_emb = rotary_emb
        self.dtype = dtype
        self._kwargs = {}
        if layer_type is not None and "layer_type" in inspect.signature(rotary_emb.forward).parameters:
            self._kwargs["layer_type"] = layer_type
        self._last: tuple[int, int, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for integer ``positions`` (T,): two tensors (T, head_dim)."""
        probe = torch.empty(0, dtype=self.dtype, device=positions.device)
        cos, sin = self.rotary_emb(probe, positions.view(1, -1), **self._kwargs)
        return cos[0], sin[0]

    def cos_sin_range(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions ``start .. start+length-1``."""
        if self._last is not None and self._last[0] == start and self._last[1] == length:
            return self._last[2], self._last[3]
        cos, sin = self.cos_sin(torch.arange(start, start + length))
        self._last = (start, length, cos, sin)
        return cos, sin
