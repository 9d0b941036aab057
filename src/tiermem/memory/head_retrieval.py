"""Question-driven block retrieval through the model's retrieval heads, one decision shared by every layer.

InfLLM and EM-LLM let each layer pick its blocks with the mean query of each execution block against one
representative key per block. On real prose that ranks the needle's block mid-pack in most layers (measured in
BENCHMARKS.md, "Why block memory failed on prose"). This module is the alternative the measurements point to:

1. **Question-aware**: before the question is read, a probe forward runs it through the model without storing
   anything (:meth:`tiermem.memory.layer.TierLayer.probe`) and records the pre-RoPE queries of the retrieval heads.
2. **Max, not mean**: a block scores the max over question tokens and over *all* its tokens of q.k (a fact is a few
   tokens; a mean over a question or a representative over a block washes it out).
3. **Retrieval heads, one decision**: only the calibrated heads (:mod:`tiermem.memory.retrieval_heads`) vote, each
   head's scores z-normalised over the blocks and averaged; the winning blocks (and ``neighbours`` blocks after each,
   so a fact cut by a block boundary survives) are attended by every layer, for the question and the whole answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tiermem.memory.retrieval_heads import RetrievalHeads, block_scores, combine

if TYPE_CHECKING:
    from tiermem.memory.context_memory import ContextMemoryLayer


class SharedRetrieval:
    """The probe's queries per layer and the block set chosen from them, shared by one cache's layers."""

    def __init__(self, heads: RetrievalHeads, neighbours: int):
        self.heads: dict[int, list[int]] = {}
        for layer, head in heads.heads:
            self.heads.setdefault(layer, []).append(head)
        self.neighbours = neighbours
        self.queries: dict[int, torch.Tensor] = {}  # layer -> (Hsel, T, D) pre-RoPE probe queries
        self.chosen: list[int] | None = None
        self.last_scores: torch.Tensor | None = None  # (n_blocks,) combined scores of the last decision

    def record(self, layer_idx: int, q: torch.Tensor) -> None:
        """Keep the probe's pre-RoPE queries ``q`` (1, Hq, T, D) of this layer's retrieval heads."""
        if layer_idx in self.heads:
            part = q[0, self.heads[layer_idx]].float()
            previous = self.queries.get(layer_idx)
            self.queries[layer_idx] = part if previous is None else torch.cat([previous, part], dim=1)

    def decide(self, layers: list[ContextMemoryLayer], choose: Callable[[list[int]], list[int]]) -> list[int] | None:
        """Score every block with the recorded queries, take them in score order through ``choose`` (the
        policy's budget: InfLLM's top-k, EM-LLM's token fill), add neighbours; returns sorted block ids, or None
        when there is nothing to decide (no blocks yet, or no retrieval head in a block-memory layer)."""
        by_index = {layer.info.layer_idx: layer for layer in layers}
        per_head: list[torch.Tensor] = []
        for layer_idx, queries in self.queries.items():
            layer = by_index.get(layer_idx)
            if layer is None or not layer.block_sizes:
                continue
            keys = layer.all_block_keys()  # (Hkv, S, D), blocks in order
            group = layer.info.group_size
            for row, head in enumerate(self.heads[layer_idx]):
                per_head.append(block_scores(queries[row], keys[head // group], list(layer.block_sizes)))
        self.queries = {}
        n_blocks = len(layers[0].block_sizes) if layers else 0
        if not per_head or n_blocks == 0:
            self.chosen = None
            return None
        scores = combine(per_head)
        self.last_scores = scores
        picked = choose(scores.argsort(descending=True).tolist())
        self.chosen = sorted(set(picked) | set(self._neighbours(picked, layers[0].block_sizes)))
        return self.chosen

    def _neighbours(self, picked: list[int], sizes: list[int]) -> list[int]:
        """The ``neighbours`` blocks after each picked block, best-ranked first, within ``neighbours`` times the
        picked tokens (so the attended set stays bounded when blocks differ in size, as EM-LLM's events do)."""
        room = self.neighbours * sum(sizes[b] for b in picked)
        extra: list[int] = []
        for block in picked:
            for step in range(1, self.neighbours + 1):
                n = block + step
                if n < len(sizes) and n not in picked and n not in extra and sizes[n] <= room:
                    extra.append(n)
                    room -= sizes[n]
        return extra
