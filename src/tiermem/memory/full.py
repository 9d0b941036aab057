"""The baseline: every token's K and V kept, nothing evicted."""

from __future__ import annotations

from dataclasses import dataclass

from tiermem.layer_info import LayerInfo
from tiermem.memory.base import Policy
from tiermem.memory.layer import DenseLayer, TierLayer


@dataclass
class Full(Policy):
    """Full attention over an uncompressed cache: the reference every other policy is measured against.

    ``extrapolate=True`` lets prompts run past the model's trained positions (plain RoPE extrapolation), to show
    what happens there; by default such prompts are refused.
    """

    name = "full"
    paper = "baseline (no compression)"
    extrapolate: bool = False

    @property
    def fits_any_length(self) -> bool:
        return self.extrapolate

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return DenseLayer(info)
