"""SnapKV: keep the prompt tokens that the last queries of the prompt attend to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tiermem.errors import TiermemError
from tiermem.layer_info import LayerInfo
from tiermem.memory.base import BudgetedPolicy
from tiermem.memory.layer import DenseLayer, TierLayer

POOLINGS = ("avgpool", "maxpool")
SELECTIONS = ("token", "chunk")


@dataclass
class SnapKV(BudgetedPolicy):
    """SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469).

    Once the context is in, each layer scores every context token by the softmax attention it receives from the last
    ``window_size`` queries (the observation window), smooths the scores with a 1-D pooling of ``kernel_size``, and
    keeps the top ``budget - window_size`` tokens per KV head plus the window itself. Generated tokens are appended
    uncompressed. Kept keys stay rotated at their original positions.

    Defaults are the reference code's ``init_snapkv``: window 32, kernel 5, average pooling (its LongBench configs
    use kernel 7 with max pooling: ``kernel_size=7, pooling="maxpool"``).

    Departures from the reference code:
    - GQA: the reference repeats K/V to the query-head count before selecting and caching, which multiplies memory by
      the group size. Here scores are averaged over the query heads of each KV group (kvpress's way) and the cache
      keeps ``num_key_value_heads`` heads.
    - The vote is the mean over window queries (the reference sums; the ranking is identical).
    - Question-agnostic by default: the window is the end of the context, not of the question (kvpress's default).
      SnapKV's own setting is the engine's ``question_aware=True``.

    ``selection="chunk"`` is a tiermem option, not in the paper (ChunkKV, arXiv 2502.00299, is the published form
    of the idea): the prefix is cut into ``chunk_size``-token chunks scored by their best token, and whole chunks are
    kept, so a multi-token fact (a 7-digit number is 7 tokens) survives whole. Registered as ``snapkv-chunk``.
    """

    name = "snapkv"
    paper = "SnapKV, arXiv 2404.14469"
    hot_set = "the whole context until it is compressed"
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avgpool"
    selection: str = "token"
    chunk_size: int = 32

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise TiermemError(f"snapkv pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.selection not in SELECTIONS:
            raise TiermemError(f"snapkv selection must be one of {', '.join(SELECTIONS)}, got '{self.selection}'")
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.chunk_size < 1:
            raise TiermemError("snapkv needs window_size >= 1, chunk_size >= 1 and an odd kernel_size >= 1")
        super().__post_init__()

    def fixed_tokens(self) -> int:
        return self.window_size

    def fixed_parts(self) -> str:
        return "observation window"

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return SnapKVLayer(info, self)

    def peak_tokens(self, info: LayerInfo, context_tokens: int, total_tokens: int) -> int:
        if info.sliding_window is not None:
            return super().peak_tokens(info, context_tokens, total_tokens)
        return max(context_tokens, self.budget_for(context_tokens) + total_tokens - context_tokens)


def snapkv_scores(
    window_queries: torch.Tensor, keys: torch.Tensor, scaling: float, kernel_size: int, pooling: str
) -> torch.Tensor:
    """Importance of each prefix token for one layer.

    ``window_queries`` (1, Hq, w, D): the last w queries, rotated. ``keys`` (1, Hkv, S, D): all keys, rotated; the
    window's own keys are the last w. Returns (1, Hkv, S - w): softmax attention from the window (over all S keys,
    causal inside the window), averaged over window queries, pooled along the sequence, averaged over each KV group.
    """
    _, hq, w, d = window_queries.shape
    _, hkv, s, _ = keys.shape
    group = hq // hkv
    logits = window_queries.reshape(1, hkv, group * w, d) @ keys.transpose(-1, -2) * scaling  # (1, Hkv, G*w, S)
    logits = logits.view(1, hkv, group, w, s)
    future = torch.ones(w, s, dtype=torch.bool).triu(diagonal=s - w + 1)  # window query i is at position s - w + i
    probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    votes = probs[..., : s - w].mean(dim=3).reshape(1, hq, s - w)  # (1, Hq, S - w)
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    votes = pool(votes, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    return votes.view(1, hkv, group, s - w).mean(dim=2)


def select_tokens(scores: torch.Tensor, keep: int, selection: str, chunk_size: int) -> torch.Tensor:
    """Indices (Hkv, keep), ascending, of the prefix tokens to keep given ``scores`` (1, Hkv, P)."""
    scores = scores[0]
    if selection == "chunk":
        hkv, p = scores.shape
        n_chunks = -(-p // chunk_size)
        padded = F.pad(scores, (0, n_chunks * chunk_size - p), value=float("-inf"))
        chunk_scores = padded.view(hkv, n_chunks, chunk_size).amax(dim=-1)  # a chunk is as good as its best token
        best = chunk_scores.topk(min(keep // chunk_size, n_chunks), dim=-1).indices
        chosen = torch.zeros(hkv, n_chunks, dtype=torch.bool).scatter_(1, best, True)
        in_chosen = chosen.repeat_interleave(chunk_size, dim=1)[:, :p]
        # Whole chosen chunks first; any slots left go to the best remaining tokens.
        scores = scores.masked_fill(in_chosen, float("inf"))
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


class SnapKVLayer(DenseLayer):
    def __init__(self, info: LayerInfo, policy: SnapKV):
        super().__init__(info)
        self.policy = policy
        self.window_queries: torch.Tensor | None = None  # (1, Hq, <=w, D), rotated
        self.compressed = False

    def after_attend(self, rotated_q: torch.Tensor) -> None:
        if self.compressed:
            return
        recent = rotated_q if self.window_queries is None else torch.cat([self.window_queries, rotated_q], dim=2)
        self.window_queries = recent[:, :, -self.policy.window_size :].clone(memory_format=torch.contiguous_format)

    def end_context(self) -> None:
        if self.compressed:
            return
        n = self.buffer.length
        budget = self.policy.budget_for(self.context_tokens or n)
        w = self.policy.window_size
        if n > budget and n > w and self.window_queries is not None and self.window_queries.shape[2] == w:
            keys = self.buffer.view()[0]
            scores = snapkv_scores(
                self.window_queries, keys, self.info.scaling, self.policy.kernel_size, self.policy.pooling
            )
            prefix = select_tokens(scores, budget - w, self.policy.selection, self.policy.chunk_size)
            window = torch.arange(n - w, n).expand(prefix.shape[0], w)
            self.buffer.keep(torch.cat([prefix, window], dim=1), capacity=budget + self.headroom())
        self.window_queries = None
        self.compressed = True
