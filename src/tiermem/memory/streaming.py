"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.layer_info import LayerInfo
from tiermem.memory.base import BudgetedPolicy
from tiermem.memory.layer import DenseLayer, TierLayer, attention
from tiermem.rope import apply_rope


@dataclass
class StreamingLLM(BudgetedPolicy):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): keep ``n_sink`` initial tokens and the most recent
    ``budget - n_sink`` tokens of every layer; evict the middle after every forward.

    Defaults: ``n_sink=4`` (the paper's). ``rerotate=True`` is the paper's position rule: a token is rotated at its
    slot in the cache, not at its original index, so positions never exceed the budget and generation can go past
    the trained window (the kvpress press keeps original positions unless wrapped in ``KeyRerotationPress``;
    ``rerotate=False`` gives that behaviour). Departure: the paper feeds one token at a time; tiermem evicts after
    each prefill chunk, so a query inside a chunk may also see the earlier tokens of its own chunk.
    """

    name = "streaming"
    paper = "StreamingLLM, arXiv 2309.17453"
    hot_set = "sinks, recent tokens and one prefill chunk"
    n_sink: int = 4
    rerotate: bool = True

    @property
    def fits_any_length(self) -> bool:
        return self.rerotate

    def fixed_tokens(self) -> int:
        return self.n_sink

    def fixed_parts(self) -> str:
        return "attention sinks"

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return StreamingLayer(info, self)

    def peak_tokens(self, info: LayerInfo, context_tokens: int, total_tokens: int) -> int:
        if info.sliding_window is not None:
            return super().peak_tokens(info, context_tokens, total_tokens)
        return min(total_tokens, self.budget_for(context_tokens) + 512)


class StreamingLayer(DenseLayer):
    def __init__(self, info: LayerInfo, policy: StreamingLLM):
        super().__init__(info)
        self.policy = policy
        self.budget: int | None = None

    def plan(self, context_tokens: int, total_tokens: int) -> None:
        self.budget = self.policy.budget_for(context_tokens)
        super().plan(context_tokens, total_tokens)

    def reserve_hint(self, context_tokens: int, total_tokens: int) -> int:
        assert self.budget is not None
        return min(total_tokens, self.budget + 512)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.budget is None:  # context-manager mode: the first forward is the whole prompt
            self.plan(q.shape[2], q.shape[2])
        if not self.policy.rerotate:
            return super().attend(q, k, v)
        # Keys are stored before RoPE and rotated at their cache slot on every read.
        t = q.shape[2]
        old = self.buffer.length
        self.buffer.append(k, v, torch.arange(self.seen, self.seen + t))
        self.seen += t
        keys, values, _ = self.buffer.view()
        slots = torch.arange(keys.shape[2])
        cos, sin = self.info.rope.cos_sin_range(0, keys.shape[2])
        out = attention(
            apply_rope(q, cos[old:], sin[old:]), apply_rope(keys, cos, sin), values, slots[old:], slots, self.info
        )
        self.evict()
        return out

    def after_attend(self, rotated_q: torch.Tensor) -> None:
        self.evict()

    def end_context(self) -> None:
        """Give back the prefill chunk's slots: from here on the cache holds at most ``budget + 1`` tokens."""
        assert self.budget is not None
        n = self.buffer.length
        self.buffer.keep(torch.arange(n), capacity=min(n, self.budget) + 1)

    def evict(self) -> None:
        """Keep the sinks and the most recent tokens, ``budget`` in all."""
        assert self.budget is not None
        n = self.buffer.length
        if n > self.budget:
            recent = self.budget - self.policy.n_sink
            self.buffer.keep(torch.cat([torch.arange(self.policy.n_sink), torch.arange(n - recent, n)]))
