"""Expected Attention: score keys by the attention that future queries, modelled as a Gaussian, should pay them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tiermem.errors import TiermemError
from tiermem.memory.scorer import ScorerLayer, ScorerPolicy, group_mean


def average_rope(layer: ScorerLayer, start: int, count: int) -> torch.Tensor:
    """The RoPE rotation matrix (D, D) averaged over positions ``start .. start+count-1`` (float64)."""
    cos, sin = layer.info.rope.cos_sin_range(start, count)  # (count, D) each
    d = cos.shape[1]
    half = torch.eye(d // 2, dtype=torch.float64)
    swap = torch.zeros(d, d, dtype=torch.float64)  # rotate_half as a matrix: x -> (-x2, x1)
    swap[d // 2 :, : d // 2], swap[: d // 2, d // 2 :] = half, -half
    eye = torch.eye(d, dtype=torch.float64)
    return (cos.double()[:, None] * eye + sin.double()[:, None] * swap).mean(dim=0)


@dataclass
class ExpectedAttention(ScorerPolicy):
    """Expected Attention (Devoto et al., arXiv 2510.00636), as kvpress's ExpectedAttentionPress.

    Future queries are modelled as a Gaussian: mean and covariance of the context's pre-RoPE queries (the first
    ``n_sink`` excluded), rotated by the RoPE matrix averaged over the next ``n_future_positions`` positions. A key's
    expected attention logit is ``mu.k * scale + k.Sigma.k * scale^2 / 2`` (the Gaussian's moment-generating
    function), softmaxed over the keys per query head, averaged over each KV group, and multiplied by ``||v||``
    (``use_vnorm``; ``(score + epsilon) * ||v||``). The first ``n_sink`` tokens are always kept. Defaults are kvpress's.

    The query moments are accumulated chunk by chunk during prefill (float64 sums), so the covariance is the same as
    kvpress's one-shot ``centered.T @ centered / N``. Departure: logits use the model's attention scale (kvpress uses
    1/sqrt(head_dim), and 1/head_dim for the covariance term; equal for Llama, Qwen and Mistral).
    """

    name = "expected-attention"
    paper = "Expected Attention, arXiv 2510.00636"
    needs_query_stats = True
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.n_future_positions < 1 or self.n_sink < 0:
            raise TiermemError("expected-attention needs n_future_positions >= 1 and n_sink >= 0")
        super().__post_init__()

    def protect_first(self) -> int:
        return self.n_sink

    def fixed_parts(self) -> str:
        return "sink tokens"

    def score(self, layer: ScorerLayer) -> torch.Tensor:
        assert layer.query_sum is not None and layer.query_outer is not None
        keys, values, _ = layer.buffer.view()
        n, scale = keys.shape[2], layer.info.scaling
        keys, values = keys[:, :, self.n_sink :], values[:, :, self.n_sink :]  # sinks: kept, not in the softmax
        mean = layer.query_sum / layer.query_count  # (Hq, D)
        rope = average_rope(layer, n, self.n_future_positions)
        mu = (mean @ rope.T).float()
        grouped = keys[0].float().repeat_interleave(layer.info.group_size, dim=0)  # (Hq, S, D)
        logits = (grouped @ mu[:, :, None])[..., 0] * scale  # (Hq, S)
        if self.use_covariance:
            cov = layer.query_outer / layer.query_count - mean[:, :, None] * mean[:, None, :]
            cov = (rope @ cov @ rope.T).float()  # (Hq, D, D)
            logits += ((grouped @ cov) * grouped).sum(dim=-1) * scale**2 / 2
        scores = group_mean(logits.softmax(dim=-1)[None], layer.info.num_kv_heads)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.float().norm(dim=-1)
        return F.pad(scores, (self.n_sink, 0))  # the sinks' slots are protected by the caller
