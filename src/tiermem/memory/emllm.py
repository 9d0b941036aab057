"""EM-LLM: episodic memory with events cut where the model is surprised."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import BlockStore
from tiermem.layer_info import LayerInfo
from tiermem.memory.context_memory import ContextMemoryLayer, ContextMemoryPolicy
from tiermem.memory.events import EventBoundaries, refine_boundaries
from tiermem.memory.layer import TierLayer

REFINEMENTS = ("none", "modularity", "conductance")


@dataclass
class EMLLM(ContextMemoryPolicy):
    """EM-LLM (Fountas et al., ICLR 2025, arXiv 2407.09450; em-llm/EM-LLM-model).

    InfLLM's machinery with episodic events instead of fixed blocks: a token opens a new event when its surprise
    -log p(token | prefix) exceeds ``mean + surprisal_gamma * std`` of the surprise over the local window. Events
    are clamped to ``[min_block_size, max_block_size]`` tokens. Optionally (``refinement``) each boundary moves to
    the split that maximises modularity (or minimises conductance) of the key-similarity graph
    ``A = sum over layers >= refine_from_layer and heads of K K^T``. Retrieval fills ``n_mem`` tokens with the
    events most similar to the query (k_s) and, with ``contiguity=True``, a buffer of their neighbours
    (``contiguity_buffer_size`` of the budget, k_c).

    Defaults: the reference Llama-3 config (``n_init=128, n_local=4096, n_mem=4096, min_block_size=8,
    max_block_size=128, repr_topk=4, exc_block_size=512, surprisal_gamma=1.0``; refinement and contiguity off,
    as in every shipped config). ``refine_from_layer=None`` means 5/8 of the depth (the reference's 20 of 32).

    Departures from the reference code: a token's surprise is its own -log p (the reference assigns the next token's
    surprise to each position, shifting boundaries by one); refinement looks at the current chunk without the
    previous chunk's tail; everything InfLLM's docstring lists. Surprise needs the model's logits, which tiermem's
    engine provides; under a plain ``generate()`` no surprise is observed and events fall back to
    ``max_block_size`` blocks (the reference's fallback when no token is surprising).
    """

    name = "emllm"
    paper = "EM-LLM, arXiv 2407.09450"
    n_mem: int = 4096
    min_block_size: int = 8
    max_block_size: int = 128
    surprisal_gamma: float = 1.0
    refinement: str = "none"
    refine_from_layer: int | None = None
    contiguity: bool = False
    contiguity_buffer_size: float = 0.3

    needs_surprise = True

    def __post_init__(self) -> None:
        self.check_memory_positions()
        if self.refinement not in REFINEMENTS:
            raise TiermemError(f"emllm refinement must be one of {', '.join(REFINEMENTS)}, got '{self.refinement}'")
        if not 1 <= self.min_block_size <= self.max_block_size:
            raise TiermemError("emllm needs 1 <= min_block_size <= max_block_size")
        if self.n_mem < self.max_block_size or self.n_local < self.exc_block_size or self.n_init < 0:
            raise TiermemError("emllm needs n_mem >= max_block_size and n_local >= exc_block_size")
        if not 0 < self.contiguity_buffer_size < 1:
            raise TiermemError("emllm contiguity_buffer_size is a fraction of n_mem in (0, 1)")

    def global_capacity(self) -> int:
        return (1 + self.neighbours) * self.n_mem + self.exc_block_size + 2 * self.max_block_size

    def fewest_block_tokens(self) -> int:
        # Events are cut by surprise, so their number is known only as the text is read: size the hot retrieval
        # keys for the smallest events, a bound the run cannot exceed (measured: 26-token events on average with
        # emllm-small at 8k, where the midpoint of the bounds, 36, underestimated the keys by a third).
        return self.min_block_size

    def refine_layers(self, num_layers: int) -> range:
        first = self.refine_from_layer if self.refine_from_layer is not None else (5 * num_layers) // 8
        return range(first, num_layers)

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return EMLLMLayer(info, self)

    def setup(self, layers: list[TierLayer], store: BlockStore) -> None:
        """All EM layers share one record of surprise and boundaries; refinement layers stash their keys."""
        super().setup(layers, store)
        events = EventBoundaries(self.surprisal_gamma, self.n_local)
        refine = self.refine_layers(len(layers))
        for layer in layers:
            if isinstance(layer, EMLLMLayer):
                layer.events = events
                layer.stash_keys = self.refinement != "none" and layer.info.layer_idx in refine

    def observe_surprise(self, layers: list[TierLayer], surprise: torch.Tensor) -> None:
        em_layers = [layer for layer in layers if isinstance(layer, EMLLMLayer)]
        if em_layers:
            segment_chunk(em_layers, em_layers[0].events, surprise, self)


class EMLLMLayer(ContextMemoryLayer):
    policy: EMLLM

    def __init__(self, info: LayerInfo, policy: EMLLM):
        super().__init__(info, policy)
        self.events = EventBoundaries(policy.surprisal_gamma, policy.n_local)  # replaced by the cache's shared one
        self.stash_keys = False  # set by the cache on layers whose keys feed boundary refinement
        self.stashed: list[torch.Tensor] = []
        self.contiguity_buffer: list[int] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.stash_keys:
            self.stashed.append(k[0])  # (Hkv, T, D), before RoPE
        return super().attend(q, k, v)

    def cut_blocks(self, final: bool) -> list[int]:
        """EM-LLM's ``update_memory``: events from boundary flags, merged below min and split above max size."""
        length = self.rem_k.shape[2]
        policy = self.policy
        if length < policy.min_block_size:
            return []
        flags = self.events.between(self.rem_start, self.rem_start + length)
        cuts = flags.nonzero().flatten().tolist()
        if not cuts:
            cuts = list(range(0, length, policy.max_block_size)) if length > policy.max_block_size else [length]
        edges = [0, *cuts, length]
        sizes = [b - a for a, b in itertools.pairwise(edges) if b - a > 0]
        out: list[int] = []
        pending = 0
        for i, size in enumerate(sizes):
            pending += size
            while pending >= policy.max_block_size:
                out.append(policy.max_block_size)
                pending -= policy.max_block_size
            if pending < min(policy.min_block_size, length):
                continue
            if pending > 0 and i != len(sizes) - 1:  # the last event may still grow: it waits in the remainder
                out.append(pending)
            pending = 0
        return out

    def retrieve(self, query: torch.Tensor, length: int) -> list[int]:
        """Similarity retrieval (k_s) filling the memory budget, plus the contiguity buffer (k_c) if enabled."""
        policy = self.policy
        edge = max(self.rem_k.shape[2] + length - policy.n_local, 0)
        cap = policy.n_init + policy.exc_block_size + policy.n_mem - edge - self.init_k.shape[2]
        full_cap = cap
        if policy.contiguity:
            cap -= int(policy.contiguity_buffer_size * cap + 1)
        if sum(self.block_sizes) <= cap:
            return list(range(len(self.block_sizes)))
        order = torch.argsort(self.reprs @ query, descending=True).tolist()
        chosen = _fill(order, self.block_sizes, cap, exclude=set())
        if policy.contiguity:
            self._update_contiguity(chosen, int(policy.contiguity_buffer_size * full_cap + 1))
            chosen = [b for b in self.contiguity_buffer if b not in chosen] + chosen
        return chosen

    def choose(self, order: list[int]) -> list[int]:
        """Events best first until ``n_mem`` tokens (the question's shared decision)."""
        return _fill(order, self.block_sizes, self.policy.n_mem, exclude=set())

    def _update_contiguity(self, chosen: list[int], cap: int) -> None:
        """Neighbours (+1, -1) of the retrieved events, kept as a queue across steps within ``cap`` tokens."""
        neighbours = [n for b in chosen for n in (b + 1, b - 1) if 0 <= n < len(self.block_sizes)]
        fresh = _fill(neighbours, self.block_sizes, cap, exclude=set(chosen))
        kept = list(fresh)
        used = sum(self.block_sizes[b] for b in kept)
        for old in reversed(self.contiguity_buffer):  # the most recent neighbours of earlier steps stay first
            if old in kept or old in chosen or used + self.block_sizes[old] > cap:
                continue
            kept.insert(0, old)
            used += self.block_sizes[old]
        self.contiguity_buffer = kept


def _fill(order: list[int], sizes: list[int], cap: int, exclude: set[int]) -> list[int]:
    """Take blocks in ``order`` until ``cap`` tokens; the block that crosses the cap stays only if that lands closer."""
    chosen: list[int] = []
    used = 0
    for block in order:
        if block in exclude or block in chosen:
            continue
        chosen.append(block)
        before, used = used, used + sizes[block]
        if used >= cap:
            if abs(cap - before) <= abs(used - cap):
                chosen.pop()
            break
    return chosen


def segment_chunk(layers: list[EMLLMLayer], events: EventBoundaries, surprise: torch.Tensor, policy: EMLLM) -> None:
    """After a forward: flag the new tokens' boundaries from their surprise, then refine them with key similarity."""
    start = events.surprise.numel()
    flags = events.add(surprise)
    stashed = [torch.cat(layer.stashed, dim=1) for layer in layers if layer.stashed]
    for layer in layers:
        layer.stashed = []
    if policy.refinement == "none" or not stashed or not bool(flags.any()):
        return
    keys = torch.stack(stashed).float()  # (L, Hkv, T, D)
    adjacency = torch.einsum("lhtd,lhsd->ts", keys, keys)
    boundaries = flags.nonzero().flatten().tolist()
    refined = refine_boundaries(boundaries, adjacency, policy.refinement, policy.min_block_size)
    new_flags = torch.zeros_like(flags)
    new_flags[[b for b in refined if 0 <= b < flags.numel()]] = True
    events.set_flags(start, new_flags)
