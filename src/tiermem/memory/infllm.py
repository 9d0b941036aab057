"""InfLLM: fixed-size blocks of context memory, retrieved by similarity with representative keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.errors import TiermemError
from tiermem.layer_info import LayerInfo
from tiermem.memory.context_memory import ContextMemoryLayer, ContextMemoryPolicy
from tiermem.memory.layer import TierLayer


@dataclass
class InfLLM(ContextMemoryPolicy):
    """InfLLM v1, training-free (Xiao et al., 2024, arXiv 2402.04617; thunlp/InfLLM).

    ``n_init`` initial tokens and an ``n_local``-token window stay hot; older tokens are cut into ``block_size``
    blocks, each represented by the mean key of its ``repr_topk`` tokens that received the most attention while in
    the window. Each execution block of ``exc_block_size`` queries retrieves the ``topk`` blocks whose
    representatives best match its mean query. Memory is attended at one fixed RoPE distance.

    Defaults: the reference config for Llama-3-8B, an 8k-token model like SmolLM2 (``n_init=128, n_local=4096,
    block_size=128, topk=16, repr_topk=4, exc_block_size=512``).

    Departures from the reference code: the local window keeps keys rotated at absolute positions (angles in
    float64) instead of re-rotating the window on every step, which is the same relative rotation; retrieved blocks
    are reassembled only when the retrieved set changes (the reference reuses GPU buffer slots); the GPU block cache
    (``max_cached_block``) is replaced by tiermem's RAM/disk block store sized by ``--kv-memory``.
    """

    name = "infllm"
    paper = "InfLLM, arXiv 2402.04617"
    block_size: int = 128
    topk: int = 16

    def __post_init__(self) -> None:
        self.check_memory_positions()
        for field in ("n_init", "n_local", "block_size", "topk", "repr_topk", "exc_block_size"):
            if getattr(self, field) < 1:
                raise TiermemError(f"infllm {field} must be at least 1")
        if self.exc_block_size > self.n_local:
            raise TiermemError("infllm exc_block_size must not exceed n_local")

    def global_capacity(self) -> int:
        return self.topk * (1 + self.neighbours) * self.block_size + self.block_size

    def fewest_block_tokens(self) -> int:
        return self.block_size

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return InfLLMLayer(info, self)


class InfLLMLayer(ContextMemoryLayer):
    policy: InfLLM

    def cut_blocks(self, final: bool) -> list[int]:
        size = self.policy.block_size
        return [size] * (self.rem_k.shape[2] // size)

    def retrieve(self, query: torch.Tensor, length: int) -> list[int]:
        if len(self.block_sizes) <= self.policy.topk:
            return list(range(len(self.block_sizes)))
        scores = self.reprs @ query
        return scores.topk(self.policy.topk).indices.tolist()

    def choose(self, order: list[int]) -> list[int]:
        return order[: self.policy.topk]
