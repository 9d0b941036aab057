"""Score-and-evict: the base of every kvpress-style scorer policy (SnapKV-like, Knorm, TOVA, H2O, Expected Attention).

A leaf policy is a dataclass with a :meth:`ScorerPolicy.score` method. Its :class:`ScorerLayer` stores the context
densely, gathers during prefill what the scorers ask for (the last rotated queries, the attention each key received,
pre-RoPE query statistics), and once the context is in keeps the ``budget`` best-scored tokens per KV head.
Subclasses change how the budget is split: over layers (:class:`~tiermem.memory.pyramidkv.PyramidKV`) or over the
heads of a layer (:class:`~tiermem.memory.adakv.AdaKV`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tiermem.errors import TiermemError
from tiermem.kvstore.dense import KVBuffer
from tiermem.layer_info import LayerInfo, describe_layers
from tiermem.memory.base import BudgetedPolicy
from tiermem.memory.layer import DEFAULT_CHUNK_TOKENS, DenseLayer, TierLayer, buffer_attention

if TYPE_CHECKING:
    from tiermem.kvstore.blocks import BlockStore

PROTECTED = float("inf")  # the score of a token that must be kept (sinks, observation window)


@dataclass
class ScorerPolicy(BudgetedPolicy):
    """Keep the ``budget`` highest-scored context tokens per KV head once the context is in (kvpress's ScorerPress).

    What the layer gathers is declared by the class: :meth:`query_window` rotated queries at the end of the context,
    ``needs_attention_sums`` (attention received per key, accumulated chunk by chunk) and ``needs_query_stats``
    (mean and second moment of the pre-RoPE queries). The first :meth:`protect_first` and last
    :meth:`protect_last` tokens are always kept (they count against the budget). Decoded tokens are appended.
    """

    hot_set = "the whole context until it is compressed"
    needs_attention_sums: ClassVar[bool] = False
    needs_query_stats: ClassVar[bool] = False

    @abstractmethod
    def score(self, layer: ScorerLayer) -> torch.Tensor:
        """Importance (1, Hkv, S) of the S context tokens the layer holds; higher is kept. Ties and +inf allowed."""

    def query_window(self) -> int:
        """How many of the last rotated context queries the layer keeps for :meth:`score`."""
        return 0

    def protect_first(self) -> int:
        return 0

    def protect_last(self) -> int:
        return 0

    def fixed_tokens(self) -> int:
        return self.protect_first() + self.protect_last()

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return ScorerLayer(info, self)

    def setup(self, layers: list[TierLayer], store: BlockStore) -> None:
        """Number the scored layers, so a budget can depend on a layer's depth (PyramidKV)."""
        super().setup(layers, store)
        scored = [layer for layer in layers if isinstance(layer, ScorerLayer)]
        for rank, layer in enumerate(scored):
            layer.rank, layer.num_scored = rank, len(scored)

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Iterator[None]:
        """The context-manager form: layers are built one by one as ``generate`` first reaches them, so they are
        numbered here from the model's layer list (``setup`` does it for a :class:`TierCache`)."""
        from tiermem.attention import patched_attention

        scored = [info.layer_idx for info in describe_layers(model) if info.sliding_window is None]

        def make_numbered_layer(info: LayerInfo) -> TierLayer:
            layer = self.make_layer(info)
            if isinstance(layer, ScorerLayer):
                layer.rank, layer.num_scored = scored.index(info.layer_idx), len(scored)
            return layer

        with patched_attention(model, layer_factory=make_numbered_layer):
            yield

    def layer_budget(self, context_tokens: int, rank: int, num_scored: int) -> int:
        """Tokens per KV head that scored layer number ``rank`` of ``num_scored`` keeps. Default: all alike."""
        return self.budget_for(context_tokens)

    def largest_layer_budget(self, context_tokens: int) -> int:
        return self.budget_for(context_tokens)

    def peak_tokens(
        self, info: LayerInfo, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> int:
        if info.sliding_window is not None:
            return super().peak_tokens(info, context_tokens, total_tokens, chunk_tokens)
        return max(context_tokens, self.largest_layer_budget(context_tokens) + total_tokens - context_tokens)


class ScorerLayer(DenseLayer):
    """Dense storage of one global layer under a :class:`ScorerPolicy`; compresses once, in :meth:`end_context`.

    Gathered during prefill, freed at compression: ``window_queries`` (1, Hq, <=w, D) rotated; ``received`` (Hkv, S)
    float32, attention each key received summed over the queries of its KV group; ``query_count``, ``query_sum``
    (Hq, D) and ``query_outer`` (Hq, D, D) float64, over pre-RoPE queries at positions >= ``protect_first()``.
    """

    def __init__(self, info: LayerInfo, policy: ScorerPolicy):
        super().__init__(info)
        self.policy = policy
        self.rank, self.num_scored = 0, 1
        self.compressed = False
        self.window_queries: torch.Tensor | None = None
        self.received: torch.Tensor | None = None
        self.query_count = 0
        self.query_sum: torch.Tensor | None = None
        self.query_outer: torch.Tensor | None = None

    def decode_buffer(self) -> KVBuffer | None:
        """Once compressed, a step is the dense layer's (``attend`` defers to it)."""
        kind = type(self)
        plain = kind.attend is ScorerLayer.attend and kind.after_attend is DenseLayer.after_attend
        return self.buffer if self.compressed and plain else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.compressed:
            return super().attend(q, k, v)
        if self.policy.needs_query_stats:
            self._add_query_stats(q)
        rotated, q_pos = self.append_rotated(q, k, v)
        if self.policy.needs_attention_sums:  # explicit probabilities over the decoded keys (prefill only)
            keys, values, k_pos = self.buffer.view()
            out = self._attend_and_accumulate(rotated, keys, values, q_pos, k_pos[0])
        else:
            out = buffer_attention(rotated, self.buffer, q_pos, self.info)
        w = self.policy.query_window()
        if w:
            recent = rotated if self.window_queries is None else torch.cat([self.window_queries, rotated], dim=2)
            self.window_queries = recent[:, :, -w:].clone(memory_format=torch.contiguous_format)
        return out

    def _add_query_stats(self, q: torch.Tensor) -> None:
        """Accumulate first and second moments of this step's pre-RoPE queries (1, Hq, T, D), sinks excluded."""
        skip = max(self.policy.protect_first() - self.seen, 0)
        x = q[0, :, skip:].double()  # (Hq, T', D)
        if x.shape[1] == 0:
            return
        if self.query_sum is None or self.query_outer is None:
            self.query_sum, self.query_outer = x.sum(dim=1), x.transpose(1, 2) @ x
        else:
            self.query_sum += x.sum(dim=1)
            self.query_outer += x.transpose(1, 2) @ x
        self.query_count += x.shape[1]

    def _attend_and_accumulate(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        """Attention with explicit probabilities, whose column sums are added to ``received`` (what H2O needs and
        SDPA does not return). Shapes as :func:`~tiermem.memory.layer.attention`."""
        hkv, g, t, d = self.info.num_kv_heads, self.info.group_size, q.shape[2], q.shape[3]
        logits = q.reshape(1, hkv, g * t, d) @ keys.transpose(-1, -2) * self.info.scaling  # (1, Hkv, G*T, S)
        if self.info.softcap is not None:
            logits = torch.tanh(logits / self.info.softcap) * self.info.softcap
        future = k_pos[None, :] > q_pos[:, None]  # (T, S)
        logits = logits.view(1, hkv, g, t, -1).masked_fill(future, float("-inf"))
        probs = logits.softmax(dim=-1, dtype=torch.float32)  # (1, Hkv, G, T, S)
        column_sums = probs.sum(dim=(2, 3))[0]  # (Hkv, S)
        s = column_sums.shape[1]
        if self.received is None:
            self.received = column_sums
        else:
            self.received = torch.cat([self.received, column_sums.new_zeros(hkv, s - self.received.shape[1])], dim=1)
            self.received += column_sums
        out = probs.to(q.dtype).view(1, hkv, g * t, s) @ values  # (1, Hkv, G*T, D)
        return out.view(1, self.info.num_heads, t, d)

    def budget(self) -> int:
        context = self.context_tokens or self.buffer.length
        return self.policy.layer_budget(context, self.rank, self.num_scored)

    def end_context(self) -> None:
        if self.compressed:
            return
        n, budget = self.buffer.length, self.budget()
        if n > budget:
            scores = self.policy.score(self)[0].to(torch.float32, copy=True)  # (Hkv, S), ours to edit
            first, last = self.policy.protect_first(), self.policy.protect_last()
            scores[:, :first] = PROTECTED
            if last:
                scores[:, n - last :] = PROTECTED
            self.keep_best(scores, budget)
        self.compressed = True
        self.window_queries = self.received = self.query_sum = self.query_outer = None

    def keep_best(self, scores: torch.Tensor, budget: int) -> None:
        """Keep the ``budget`` best tokens of each KV head given ``scores`` (Hkv, S), in position order."""
        index = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
        self.buffer.keep(index, capacity=budget + self.headroom())


def window_attention(window_queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention (1, Hq, w, S) of the last w context queries over all S keys, causal inside the window.

    ``window_queries`` (1, Hq, w, D) and ``keys`` (1, Hkv, S, D) are rotated; the window's own keys are the last w.
    """
    _, hq, w, d = window_queries.shape
    _, hkv, s, _ = keys.shape
    group = hq // hkv
    logits = window_queries.reshape(1, hkv, group * w, d) @ keys.transpose(-1, -2) * scaling  # (1, Hkv, G*w, S)
    future = torch.ones(w, s, dtype=torch.bool).triu(diagonal=s - w + 1)  # window query i is at position s - w + i
    logits = logits.view(1, hkv, group, w, s).masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1, dtype=torch.float32).view(1, hq, w, s)


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Average per-query-head scores (1, Hq, S) over each KV group (kvpress's GQA rule): (1, Hkv, S)."""
    _, hq, s = scores.shape
    return scores.view(1, num_kv_heads, hq // num_kv_heads, s).mean(dim=2)


def observation_window_scores(layer: ScorerLayer, window_size: int, kernel_size: int) -> torch.Tensor:
    """SnapKV's score as kvpress computes it (SnapKVPress.score): attention from the last ``window_size`` queries,
    averaged over them, average-pooled with ``kernel_size``, averaged over each KV group. Returns (1, Hkv, S); the
    window's own slots are 0 (the caller protects them)."""
    assert layer.window_queries is not None
    keys = layer.buffer.view()[0]
    s = keys.shape[2]
    votes = window_attention(layer.window_queries, keys, layer.info.scaling)[..., : s - window_size].mean(dim=2)
    votes = F.avg_pool1d(votes, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    return F.pad(group_mean(votes, layer.info.num_kv_heads), (0, window_size))


@dataclass
class WindowScorerPolicy(ScorerPolicy):
    """SnapKV's scores (:func:`observation_window_scores`) with kvpress's defaults, window 64 and kernel 5: the base
    of the policies that reuse them (PyramidKV, AdaKV). The observation window itself is always kept."""

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise TiermemError(f"{self.name} needs window_size >= 1 and an odd kernel_size >= 1")
        super().__post_init__()

    def query_window(self) -> int:
        return self.window_size

    def protect_last(self) -> int:
        return self.window_size

    def fixed_parts(self) -> str:
        return "observation window"

    def score(self, layer: ScorerLayer) -> torch.Tensor:
        return observation_window_scores(layer, self.window_size, self.kernel_size)
