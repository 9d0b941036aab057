"""TierCache: a transformers ``Cache`` whose layers are a policy's :class:`TierLayer` objects."""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from tiermem.layer_info import describe_layers
from tiermem.memory.base import Policy
from tiermem.memory.layer import TierLayer


class TierCache(Cache):
    """One :class:`TierLayer` per attention layer, built by ``policy``. Pass it to the model as ``cache=``."""

    def __init__(self, model: PreTrainedModel, policy: Policy):
        self.policy = policy
        self.infos = describe_layers(model)
        self.tier_layers: list[TierLayer] = [policy.make_layer(info) for info in self.infos]
        super().__init__(layers=list(self.tier_layers))

    def plan(self, context_tokens: int, total_tokens: int) -> None:
        """Tell every layer how long the context and the whole run will be (budgets, allocation)."""
        for layer in self.tier_layers:
            layer.plan(context_tokens, total_tokens)

    def end_context(self) -> None:
        for layer in self.tier_layers:
            layer.end_context()

    def kv_tokens(self) -> int:
        """Tokens held by the largest layer."""
        return max(layer.kv_tokens() for layer in self.tier_layers)

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.tier_layers)

    def kv_bytes_peak(self) -> int:
        """Sum of per-layer peaks: an upper bound on the peak of the sum (exact when layers peak together)."""
        return sum(layer.kv_bytes_peak() for layer in self.tier_layers)
