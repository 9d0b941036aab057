"""AdaKV: one layer budget shared by the KV heads, each head keeping as many tokens as its scores earn."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.errors import TiermemError
from tiermem.kvstore.dense import KVBuffer
from tiermem.kvstore.ragged import RaggedKV
from tiermem.layer_info import LayerInfo
from tiermem.memory.expected_attention import ExpectedAttention
from tiermem.memory.layer import TierLayer
from tiermem.memory.scorer import PROTECTED, ScorerLayer, ScorerPolicy, WindowScorerPolicy
from tiermem.rope import apply_rope


def adaptive_selection(scores: torch.Tensor, budget: int, alpha_safeguard: float) -> list[torch.Tensor]:
    """kvpress's AdaKV selection: each head's ``int(budget * alpha_safeguard)`` best tokens are kept, then the best
    ``budget * Hkv`` (score, head) pairs of the layer. ``scores`` (Hkv, S); returns each head's slots, ascending."""
    hkv, n = scores.shape
    safe = int(budget * alpha_safeguard)
    if safe:
        scores = scores.scatter(-1, scores.topk(safe, dim=-1).indices, PROTECTED)
    chosen = torch.zeros(hkv * n, dtype=torch.bool)
    chosen[scores.reshape(-1).topk(budget * hkv).indices] = True
    return [row.nonzero()[:, 0] for row in chosen.view(hkv, n)]


@dataclass
class HeadAdaptive(ScorerPolicy):
    """AdaKV (Feng et al., arXiv 2407.11550) over a scorer, as kvpress's ``AdaKVPress(press, alpha_safeguard=0.2)``:
    the layer keeps ``budget * Hkv`` tokens in all, chosen across heads by score, each head at least
    ``alpha_safeguard * budget``.

    Departure from kvpress, which keeps every head's full cache and masks the dropped keys (no memory saved): here
    each KV head keeps only its own tokens in its own block (:class:`~tiermem.kvstore.ragged.RaggedKV`), so the
    layer holds the bytes of ``budget`` tokens per head whatever the split. Ragged layers always use the growing
    allocator.
    """

    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise TiermemError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")
        super().__post_init__()

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return AdaKVLayer(info, self)


class AdaKVLayer(ScorerLayer):
    """A :class:`ScorerLayer` that turns into per-head blocks of different lengths when it compresses."""

    policy: HeadAdaptive
    buffer: KVBuffer

    def __init__(self, info: LayerInfo, policy: HeadAdaptive):
        super().__init__(info, policy)
        self.ragged: RaggedKV | None = None
        self.dense_peak = 0

    def keep_best(self, scores: torch.Tensor, budget: int) -> None:
        index = adaptive_selection(scores, budget, self.policy.alpha_safeguard)
        self.ragged = RaggedKV.from_dense(self.buffer, index, self.headroom())
        self.dense_peak = max(self.buffer.peak_nbytes, self.buffer.nbytes)
        self.buffer = KVBuffer(  # the block goes back
            self.info.num_kv_heads, self.info.head_dim, self.info.dtype, kv_format=self.info.kv_dtype
        )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.ragged is None:
            return super().attend(q, k, v)
        t = q.shape[2]
        cos, sin = self.info.rope.cos_sin_range(self.seen, t)
        q_pos = torch.arange(self.seen, self.seen + t)
        self.ragged.append(apply_rope(k, cos, sin), v, q_pos)
        self.seen += t
        return self.ragged.attend(apply_rope(q, cos, sin), q_pos, self.info)

    def kv_tokens(self) -> int:
        """Tokens per KV head on average (rounded up): the heads hold different numbers."""
        if self.ragged is None:
            return super().kv_tokens()
        return -(-sum(self.ragged.lengths) // self.info.num_kv_heads)

    def kv_bytes(self) -> int:
        return self.buffer.nbytes + (self.ragged.nbytes if self.ragged is not None else 0)

    def kv_bytes_peak(self) -> int:
        ragged = self.ragged.peak_nbytes if self.ragged is not None else 0
        return max(self.dense_peak, super().kv_bytes_peak(), ragged)


@dataclass
class AdaKV(HeadAdaptive, WindowScorerPolicy):
    """AdaKV over SnapKV's scores as kvpress computes them: kvpress's ``adakv_snapkv`` = ``AdaKVPress(SnapKVPress())``
    (window 64, kernel 5, average pooling). The observation window is kept in every head. See
    :class:`HeadAdaptive` for the selection and where it departs from kvpress (per-head blocks: memory is saved)."""

    name = "adakv"
    paper = "AdaKV, arXiv 2407.11550 (over SnapKV)"


@dataclass
class AdaKVExpectedAttention(HeadAdaptive, ExpectedAttention):
    """AdaKV's head-adaptive selection over Expected Attention's scores. kvpress's leaderboard ``expected_attention``
    is this with ``epsilon=1e-2`` (``AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))``), the registered default."""

    name = "adakv-expected-attention"
    paper = "AdaKV, arXiv 2407.11550 (over Expected Attention, arXiv 2510.00636)"
