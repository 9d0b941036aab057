"""SnapKV: keep the prompt tokens that the last queries of the prompt attend to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tiermem.errors import TiermemError
from tiermem.kvstore.dense import KVBuffer
from tiermem.layer_info import LayerInfo
from tiermem.memory.base import BudgetedPolicy
from tiermem.memory.layer import DEFAULT_CHUNK_TOKENS, DenseLayer, TierLayer
from tiermem.memory.sentences import record_sentence_ends, sentence_spans, share_sentence_ends

if TYPE_CHECKING:
    from tiermem.kvstore.blocks import BlockStore

POOLINGS = ("avgpool", "maxpool")
SELECTIONS = ("token", "chunk", "sentence")
VOTES = ("mean", "max")


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

    Further tiermem options (defaults keep the behaviour above), used by ``snapkv-sentence``:

    - ``selection="sentence"``: the units are the context's sentences (SentenceKV's idea, arXiv 2504.00970),
      found in the decoded token text the engine passes in (:mod:`tiermem.memory.sentences`); a sentence longer
      than ``chunk_size`` tokens is cut into ``chunk_size``-token pieces. Units are scored by their best token and
      taken best first while they fit; slots left go to the best remaining tokens. Without token text (plain
      ``model.generate``) the whole context is one sentence, so this falls back to ``chunk_size`` chunks.
    - ``vote="max"``: a token's score is the most attention any single window query gives it, not the mean. With
      the question in the window, most window queries are template and question words that spread attention over
      the context; the few that look a fact up (the key named by the question) are drowned by the mean.
    - ``shared_heads=True``: one selection per layer, from the scores averaged over its KV heads, so a fact is kept
      by every head or by none (SentenceKV chooses per layer too). With sentence units and max votes it measured the
      same as per-head choices on needles (BENCHMARKS.md); it makes compression one gather for all heads.
    - ``budget_includes_new=True``: the budget also covers the tokens that come after compression (the question
      when it is read after, and the new tokens, as planned), so the KV held while decoding stays within the
      budget; by default (kvpress's convention) the budget is the compressed prompt alone.
    """

    name = "snapkv"
    paper = "SnapKV, arXiv 2404.14469"
    hot_set = "the whole context until it is compressed"
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avgpool"
    selection: str = "token"
    chunk_size: int = 32
    vote: str = "mean"
    shared_heads: bool = False
    budget_includes_new: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise TiermemError(f"snapkv pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.selection not in SELECTIONS:
            raise TiermemError(f"snapkv selection must be one of {', '.join(SELECTIONS)}, got '{self.selection}'")
        if self.vote not in VOTES:
            raise TiermemError(f"snapkv vote must be one of {', '.join(VOTES)}, got '{self.vote}'")
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.chunk_size < 1:
            raise TiermemError("snapkv needs window_size >= 1, chunk_size >= 1 and an odd kernel_size >= 1")
        super().__post_init__()

    def fixed_tokens(self) -> int:
        return self.window_size

    def fixed_parts(self) -> str:
        return "observation window"

    @property
    def needs_token_text(self) -> bool:
        return self.selection == "sentence"

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return SnapKVLayer(info, self)

    def setup(self, layers: list[TierLayer], store: BlockStore) -> None:
        super().setup(layers, store)
        share_sentence_ends(layers, SnapKVLayer)

    def observe_tokens(self, layers: list[TierLayer], start: int, pieces: list[str]) -> None:
        """Record which of the tokens at positions ``start, start+1, ...`` end a sentence."""
        record_sentence_ends(layers, SnapKVLayer, start, pieces)

    def check(self, context_tokens: int, total_tokens: int, max_positions: int) -> None:
        super().check(context_tokens, total_tokens, max_positions)
        later = total_tokens - context_tokens
        budget = self.budget_for(context_tokens)
        if self.budget_includes_new and context_tokens > budget - later and budget - later <= self.window_size:
            raise TiermemError(
                f"KV budget of {budget} tokens cannot hold snapkv's {self.window_size}-token observation window plus "
                f"the {later} tokens that come after the context; raise the budget or lower budget_includes_new"
            )

    def peak_tokens(
        self, info: LayerInfo, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> int:
        if info.sliding_window is not None:
            return super().peak_tokens(info, context_tokens, total_tokens, chunk_tokens)
        later = 0 if self.budget_includes_new else total_tokens - context_tokens
        return max(context_tokens, self.budget_for(context_tokens) + later)


def snapkv_scores(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    kernel_size: int,
    pooling: str,
    vote: str = "mean",
) -> torch.Tensor:
    """Importance of each prefix token for one layer.

    ``window_queries`` (1, Hq, w, D): the last w queries, rotated. ``keys`` (1, Hkv, S, D): all keys, rotated; the
    window's own keys are the last w. Returns (1, Hkv, S - w): softmax attention from the window (over all S keys,
    causal inside the window), averaged (``vote="mean"``) or maximized (``"max"``) over window queries, pooled along
    the sequence, averaged over each KV group.
    """
    _, hq, w, d = window_queries.shape
    _, hkv, s, _ = keys.shape
    group = hq // hkv
    logits = window_queries.reshape(1, hkv, group * w, d) @ keys.transpose(-1, -2) * scaling  # (1, Hkv, G*w, S)
    logits = logits.view(1, hkv, group, w, s)
    future = torch.ones(w, s, dtype=torch.bool).triu(diagonal=s - w + 1)  # window query i is at position s - w + i
    probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    prefix = probs[..., : s - w]
    votes = (prefix.mean(dim=3) if vote == "mean" else prefix.amax(dim=3)).reshape(1, hq, s - w)  # (1, Hq, S - w)
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


def sentence_units(ends: list[int], length: int, max_tokens: int) -> torch.Tensor:
    """Token counts (U,) of the units covering positions ``[0, length)``: sentences closing after each position in
    ``ends``, a sentence longer than ``max_tokens`` cut into ``max_tokens``-token pieces (the last one shorter)."""
    sizes: list[int] = []
    for first, stop in sentence_spans(ends, 0, length):
        whole, rest = divmod(stop - first, max_tokens)
        sizes.extend([max_tokens] * whole + ([rest] if rest else []))
    return torch.tensor(sizes, dtype=torch.long)


def select_units(scores: torch.Tensor, keep: int, sizes: torch.Tensor) -> torch.Tensor:
    """Indices (H, keep), ascending, of the prefix tokens to keep given ``scores`` (1, H, P) and consecutive units
    of ``sizes`` (U,) tokens covering the prefix: units best first (by their best token) while they fit, then the
    best remaining tokens."""
    scores = scores[0]
    h, p = scores.shape
    unit_of = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)  # (P,)
    best = torch.full((h, sizes.numel()), float("-inf")).scatter_reduce(1, unit_of.expand(h, p), scores, "amax")
    starts = (sizes.cumsum(0) - sizes).tolist()
    chosen = torch.zeros(h, p, dtype=torch.bool)
    for head in range(h):
        left = keep
        for unit in best[head].argsort(descending=True).tolist():
            size = int(sizes[unit])
            if size <= left:  # a unit that does not fit is skipped, a smaller one further down may
                chosen[head, starts[unit] : starts[unit] + size] = True
                left -= size
            if left == 0:
                break
    return scores.masked_fill(chosen, float("inf")).topk(keep, dim=-1).indices.sort(dim=-1).values


class SnapKVLayer(DenseLayer):
    def __init__(self, info: LayerInfo, policy: SnapKV):
        super().__init__(info)
        self.policy = policy
        self.window_queries: torch.Tensor | None = None  # (1, Hq, <=w, D), rotated
        self.compressed = False
        self.sentence_end_positions: list[int] = []  # shared by the layers (SnapKV.setup), filled by observe_tokens

    def decode_buffer(self) -> KVBuffer | None:
        """Once compressed, a step only appends and attends (``after_attend`` returns at once)."""
        kind = type(self)
        plain = kind.attend is DenseLayer.attend and kind.after_attend is SnapKVLayer.after_attend
        return self.buffer if self.compressed and plain else None

    def after_attend(self, rotated_q: torch.Tensor) -> None:
        if self.compressed:
            return
        recent = rotated_q if self.window_queries is None else torch.cat([self.window_queries, rotated_q], dim=2)
        self.window_queries = recent[:, :, -self.policy.window_size :].clone(memory_format=torch.contiguous_format)

    def end_context(self) -> None:
        if self.compressed:
            return
        n, policy = self.buffer.length, self.policy
        kept = policy.budget_for(self.context_tokens or n)  # prompt tokens to keep
        if policy.budget_includes_new:
            kept -= self.headroom()
        w = policy.window_size
        if n > kept and n > w and self.window_queries is not None and self.window_queries.shape[2] == w:
            keep = max(kept - w, 0)  # SnapKV.check refuses budgets that cannot hold the window
            keys = self.buffer.view()[0]
            scores = snapkv_scores(
                self.window_queries, keys, self.info.scaling, policy.kernel_size, policy.pooling, policy.vote
            )
            if policy.shared_heads:
                scores = scores.mean(dim=1, keepdim=True)  # (1, 1, P): one choice for the layer
            if policy.selection == "sentence":
                sizes = sentence_units(self.sentence_end_positions, n - w, policy.chunk_size)
                prefix = select_units(scores, keep, sizes)
            else:
                prefix = select_tokens(scores, keep, policy.selection, policy.chunk_size)
            index = torch.cat([prefix, torch.arange(n - w, n).expand(prefix.shape[0], w)], dim=1)
            # One shared row keeps the same tokens in every head (a 1-D keep); else one row per KV head.
            self.buffer.keep(index[0] if policy.shared_heads else index, capacity=keep + w + self.headroom())
        self.window_queries = None
        self.compressed = True
