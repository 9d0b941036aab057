"""Rotary position embeddings at any positions we choose, from the model's own RoPE parameters.

Policies decide which position a token is rotated at (its original index, its slot in the cache, or one fixed
distance for retrieved memory), so tiermem rotates queries and keys itself instead of using the cos/sin tables the
model computed for its own position ids.

Angles are computed in float64: transformers computes ``position * inv_freq`` in float32, whose rounding at position
100k is about 0.01 rad, and block-memory policies rotate and un-rotate keys at positions far past the trained window.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# RoPE types whose frequencies depend on the sequence length at run time: ask the module itself.
DYNAMIC_TYPES = ("dynamic", "longrope")
RECENT_STEPS = 64  # memoized single positions: one per row of the largest decode batch, with room to spare


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., T, D) by the angles in ``cos``/``sin`` (T, D) (HF's half-split layout)."""
    return x * cos + rotate_half(x) * sin


def apply_rope_pair(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope` of queries (1, Hq, T, D) and keys (1, Hkv, T, D) at the same positions, as one rotation
    of their heads side by side when T = 1 (a decode step: 8 operations instead of 12, the same values)."""
    if q.shape[2] != 1 or q.dtype != k.dtype:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rotated = apply_rope(torch.cat((q, k), dim=1), cos, sin)
    return rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse rotation of :func:`apply_rope` (rotating by minus the angles)."""
    return x * cos - rotate_half(x) * sin


class Rope:
    """cos/sin tables of one RoPE flavour of a model (Gemma3 has one for local and one for global layers).

    ``cos_sin_range`` memoizes: every layer of one forward asks for the same range (the last one is kept), and a
    batch of sessions decoding together (``tiermem.serve.batch``) asks for one single position per row (the 64 most
    recent are kept; only single positions, so a long prompt's chunks do not pile up tables).
    """

    def __init__(self, rotary_emb: Any, layer_type: str | None, dtype: torch.dtype):
        self.rotary_emb = rotary_emb
        self.dtype = dtype
        per_type = "layer_type" in inspect.signature(rotary_emb.forward).parameters
        self._kwargs = {"layer_type": layer_type} if per_type and layer_type is not None else {}
        prefix = f"{layer_type}_" if self._kwargs else ""
        rope_type = rotary_emb.rope_type[layer_type] if self._kwargs else rotary_emb.rope_type
        self.inv_freq: torch.Tensor | None = None
        if rope_type not in DYNAMIC_TYPES:
            self.inv_freq = getattr(rotary_emb, f"{prefix}inv_freq").double()
            self.scaling = float(getattr(rotary_emb, f"{prefix}attention_scaling"))
        self._last: tuple[int, int, torch.Tensor, torch.Tensor] | None = None
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> tables of length 1

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for integer ``positions`` (T,): two tensors (T, head_dim) in ``dtype`` (default: the model's)."""
        dtype = dtype or self.dtype
        if self.inv_freq is None:
            probe = torch.empty(0, dtype=self.dtype, device=positions.device)
            cos, sin = self.rotary_emb(probe, positions.view(1, -1), **self._kwargs)
            return cos[0].to(dtype), sin[0].to(dtype)
        freqs = positions.double()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)

    def cos_sin_range(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions ``start .. start+length-1``."""
        if length == 1:
            hit = self._steps.get(start)
            if hit is None:
                if len(self._steps) >= RECENT_STEPS:  # drop the oldest (dicts keep insertion order)
                    del self._steps[next(iter(self._steps))]
                hit = self._steps[start] = self.cos_sin(torch.arange(start, start + 1))
            return hit
        if self._last is None or self._last[:2] != (start, length):
            self._last = (start, length, *self.cos_sin(torch.arange(start, start + length)))
        return self._last[2], self._last[3]
