"""InfLLM: fixed-size blocks of context memory, retrieved by similarity with representative keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import BlockStore
from tiermem.layer_info import LayerInfo
from tiermem.memory.context_memory import ContextMemoryLayer, ContextMemoryPolicy
from tiermem.memory.layer import TierLayer
from tiermem.memory.sentences import record_sentence_ends, share_sentence_ends


@dataclass
class InfLLM(ContextMemoryPolicy):
    """InfLLM v1, training-free (Xiao et al., 2024, arXiv 2402.04617; thunlp/InfLLM).

    ``n_init`` initial tokens and an ``n_local``-token window stay hot; older tokens are cut into ``block_size``
    blocks, each represented by the mean key of its ``repr_topk`` tokens that received the most attention while in
    the window. Each execution block of ``exc_block_size`` queries retrieves the ``topk`` blocks whose
    representatives best match its mean query. Memory is attended at one fixed RoPE distance.

    Defaults: the reference config for Llama-3-8B, an 8k-token model like SmolLM2 (``n_init=128, n_local=4096,
    block_size=128, topk=16, repr_topk=4, exc_block_size=512``).

    ``boundaries="sentence"`` (a tiermem variant, SentenceKV's idea applied to InfLLM's blocks): each block ends at
    the sentence end nearest to ``block_size`` tokens, between half and one and a half blocks (``block_size`` when
    no sentence ends there), so a fact is not split between two blocks that are retrieved separately. The sentence
    ends come from the tokens' decoded text (:mod:`tiermem.memory.sentences`). Default ``"fixed"``: the paper's.

    Departures from the reference code: the local window keeps keys rotated at absolute positions (angles in
    float64) instead of re-rotating the window on every step, which is the same relative rotation; retrieved blocks
    are reassembled only when the retrieved set changes (the reference reuses GPU buffer slots); the GPU block cache
    (``max_cached_block``) is replaced by tiermem's RAM/disk block store sized by ``--kv-memory``.
    """

    name = "infllm"
    paper = "InfLLM, arXiv 2402.04617"
    block_size: int = 128
    topk: int = 16
    boundaries: str = "fixed"  # "fixed" (the paper's) or "sentence" (a tiermem variant, see above)

    def __post_init__(self) -> None:
        self.check_memory_positions()
        if self.boundaries not in ("fixed", "sentence"):
            raise TiermemError(f"infllm boundaries must be 'fixed' or 'sentence', not {self.boundaries!r}")
        for field in ("n_init", "n_local", "block_size", "topk", "repr_topk", "exc_block_size"):
            if getattr(self, field) < 1:
                raise TiermemError(f"infllm {field} must be at least 1")
        if self.exc_block_size > self.n_local:
            raise TiermemError("infllm exc_block_size must not exceed n_local")

    def block_range(self) -> tuple[int, int]:
        """Fewest and most tokens a block may hold."""
        if self.boundaries == "fixed":
            return self.block_size, self.block_size
        return max(1, self.block_size // 2), self.block_size + self.block_size // 2

    def global_capacity(self) -> int:
        most = self.block_range()[1]
        return self.topk * (1 + self.neighbours) * most + most

    def fewest_block_tokens(self) -> int:
        return self.block_range()[0]

    @property
    def needs_token_text(self) -> bool:
        return self.boundaries == "sentence"

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return InfLLMLayer(info, self)

    def setup(self, layers: list[TierLayer], store: BlockStore) -> None:
        super().setup(layers, store)
        share_sentence_ends(layers, InfLLMLayer)

    def observe_tokens(self, layers: list[TierLayer], start: int, pieces: list[str]) -> None:
        """Record which of the tokens at positions ``start, start+1, ...`` end a sentence."""
        record_sentence_ends(layers, InfLLMLayer, start, pieces)


class InfLLMLayer(ContextMemoryLayer):
    policy: InfLLM
    sentence_end_positions: list[int]  # shared by the layers (InfLLM.setup), filled by observe_tokens

    def cut_blocks(self, final: bool) -> list[int]:
        size, length = self.policy.block_size, self.rem_k.shape[2]
        if self.policy.boundaries == "fixed":
            return [size] * (length // size)
        return sentence_blocks(self.sentence_end_positions, self.rem_start, length, self.policy.block_range(), size)

    def retrieve(self, query: torch.Tensor, length: int) -> list[int]:
        if len(self.block_sizes) <= self.policy.topk:
            return list(range(len(self.block_sizes)))
        scores = self.reprs @ query
        return scores.topk(self.policy.topk).indices.tolist()

    def choose(self, order: list[int]) -> list[int]:
        return order[: self.policy.topk]


def sentence_blocks(ends: list[int], start: int, length: int, bounds: tuple[int, int], size: int) -> list[int]:
    """Sizes of the blocks to cut from ``length`` tokens starting at position ``start``: each ends after the
    sentence end (positions in ``ends``) that makes it nearest to ``size`` tokens within ``bounds`` (fewest, most),
    or holds ``size`` tokens when no sentence ends there. A block is cut only once ``most`` tokens are in, so the
    choice never changes as more text arrives."""
    fewest, most = bounds
    stop = start + length
    candidates = sorted({e + 1 for e in ends if start + fewest <= e + 1 <= stop})
    out: list[int] = []
    while stop - start >= most:
        inside = [c - start for c in candidates if start + fewest <= c <= start + most]
        cut = min(inside, key=lambda n: (abs(n - size), -n)) if inside else size
        out.append(cut)
        start += cut
    return out
