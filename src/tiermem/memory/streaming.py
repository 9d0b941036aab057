"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.layer_info import LayerInfo
from tiermem.memory.base import BudgetedPolicy
from tiermem.memory.layer import DEFAULT_CHUNK_TOKENS, DenseLayer, TierLayer, buffer_attention
from tiermem.rope import apply_rope


@dataclass
class StreamingLLM(BudgetedPolicy):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): keep ``n_sink`` initial tokens (attention sinks) and
    the most recent ``budget - n_sink`` tokens of every layer.

    Defaults: ``n_sink=4`` (the paper's). ``rerotate=True`` is the paper's position rule: tokens sit at their slot in
    the cache, so positions never exceed the budget and generation can go past the trained window. kvpress's press
    keeps original positions unless wrapped in ``KeyRerotationPress``; ``rerotate=False`` gives that behaviour.

    Departures: the paper feeds one token at a time; tiermem evicts after each prefill chunk, so a query inside a
    chunk also sees the earlier tokens of its chunk. ``evict_during_prefill=False`` instead attends the whole context
    and evicts once it is in (what kvpress's press does). Implementation (same attention, less copying): recent keys
    are rotated once at their original positions, which keeps their distances to the query exactly as cache slots
    would; only the sinks are re-rotated, in place, to sit just before the window; evicted tokens are masked at once
    and dropped from memory every ``slack`` tokens.
    """

    name = "streaming"
    paper = "StreamingLLM, arXiv 2309.17453"
    hot_set = "sinks, recent tokens and one prefill chunk"
    n_sink: int = 4
    rerotate: bool = True
    evict_during_prefill: bool = True

    @property
    def fits_any_length(self) -> bool:
        return self.rerotate and self.evict_during_prefill

    def fixed_tokens(self) -> int:
        return self.n_sink

    def fixed_parts(self) -> str:
        return "attention sinks"

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return StreamingLayer(info, self)

    def peak_tokens(
        self, info: LayerInfo, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> int:
        if info.sliding_window is not None or not self.evict_during_prefill:
            return super().peak_tokens(info, context_tokens, total_tokens, chunk_tokens)
        return min(total_tokens, self.budget_for(context_tokens) + StreamingLayer.slack + chunk_tokens)


class StreamingLayer(DenseLayer):
    """Buffer layout: the ``n_sink`` sinks in the first slots, then the recent tokens (oldest possibly evicted)."""

    slack = 64  # evicted tokens kept (masked) before the buffer is compacted

    def __init__(self, info: LayerInfo, policy: StreamingLLM):
        super().__init__(info)
        self.policy = policy
        self.budget: int | None = None
        self.window_start = 0  # first position of the recent window; tokens before it (but sinks) are evicted
        self.evicting = policy.evict_during_prefill
        self.sink_keys: torch.Tensor | None = None  # (1, Hkv, n_sink, D) before RoPE

    def plan(self, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        self.budget = self.policy.budget_for(context_tokens)
        super().plan(context_tokens, total_tokens, chunk_tokens)

    def reserve_hint(self, context_tokens: int, total_tokens: int) -> int:
        assert self.budget is not None
        if not self.evicting:
            return total_tokens
        return min(total_tokens, self.budget + self.slack + self.chunk_tokens)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.budget is None:  # context-manager mode: the first forward is the whole prompt
            self.plan(q.shape[2], q.shape[2])
        n_sink, start = self.policy.n_sink, self.seen
        if start < n_sink:  # the sinks' keys before RoPE, gathered from the chunks they arrive in
            part = k[:, :, : n_sink - start].clone()
            self.sink_keys = part if self.sink_keys is None else torch.cat([self.sink_keys, part], dim=2)
        if self.sink_keys is not None and self.policy.rerotate and start >= n_sink:
            self._place_sinks()
        q, q_pos = self.append_rotated(q, k, v)
        k_pos = self.buffer.positions[0, : self.buffer.length]
        evicted = (k_pos >= n_sink) & (k_pos < self.window_start)
        k_pos = k_pos.masked_fill(evicted, torch.iinfo(torch.long).max)  # invisible to every query
        out = buffer_attention(q, self.buffer, q_pos, self.info, k_pos)
        if self.evicting:
            self._evict()
        return out

    def _place_sinks(self) -> None:
        """Rotate the sinks to sit right before the window: their distance to each query is then the cache-slot
        distance of the paper (sink j at slot j, window tokens at slots n_sink, n_sink + 1, ...)."""
        assert self.sink_keys is not None
        n_sink = self.policy.n_sink
        first = max(self.window_start, n_sink) - n_sink
        cos, sin = self.info.rope.cos_sin(torch.arange(first, first + n_sink))
        self.buffer.write_keys(0, apply_rope(self.sink_keys, cos, sin))

    def _evict(self) -> None:
        """Move the window to the last ``budget - n_sink`` tokens; compact once ``slack`` tokens are dead."""
        assert self.budget is not None
        n_sink = self.policy.n_sink
        self.window_start = max(n_sink, self.seen - (self.budget - n_sink))
        k_pos = self.buffer.positions[0, : self.buffer.length]
        dead = int(((k_pos >= n_sink) & (k_pos < self.window_start)).sum())
        if dead > self.slack:
            alive = (k_pos < n_sink) | (k_pos >= self.window_start)
            self.buffer.keep(alive.nonzero().flatten())

    def end_context(self) -> None:
        """Evict down to the budget and give back the prefill chunk's slots."""
        assert self.budget is not None
        self.evicting = True
        self._evict()
        k_pos = self.buffer.positions[0, : self.buffer.length]
        alive = (k_pos < self.policy.n_sink) | (k_pos >= self.window_start)
        self.buffer.keep(alive.nonzero().flatten(), capacity=min(self.buffer.length, self.budget) + self.slack + 1)

    def kv_tokens(self) -> int:
        """Tokens in the budget: sinks plus the recent window (evicted tokens awaiting compaction excluded)."""
        k_pos = self.buffer.positions[0, : self.buffer.length]
        return int(((k_pos < self.policy.n_sink) | (k_pos >= self.window_start)).sum())
