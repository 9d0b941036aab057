"""The baseline: every token's K and V kept, nothing evicted."""

from __future__ import annotations

from dataclasses import dataclass

from tiermem.layer_info import LayerInfo
from tiermem.memory.base import Policy
from tiermem.memory.layer import DenseLayer, TierLayer


@dataclass
class Full(Policy):
    """Full attention over an uncompressed cache: the reference every other policy is measured against."""

    name = "full"
    paper = "baseline (no compression)"

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return DenseLayer(info)
