"""Observed attention (H2O's heavy hitters): keep the keys that received the most attention during prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.memory.scorer import ScorerLayer, ScorerPolicy


@dataclass
class ObservedAttention(ScorerPolicy):
    """Observed attention, kvpress's ObservedAttentionPress after H2O (Zhang et al., NeurIPS 2023, arXiv
    2306.14048): a key's score is the attention it received from every context query, summed, divided by the number
    of queries that can see it (S - position, under the causal mask), averaged over each KV group.

    The attention is accumulated chunk by chunk during the chunked prefill (the layer computes explicit softmax
    probabilities while prefilling); kvpress needs ``attn_implementation="eager"`` and one full S x S matrix.

    Departures from the paper: H2O evicts one token per generated token with a recent window beside the heavy
    hitters; here, as in kvpress, the context is compressed once with no recent window.
    """

    name = "observed-attention"
    paper = "H2O, arXiv 2306.14048"
    needs_attention_sums = True

    def score(self, layer: ScorerLayer) -> torch.Tensor:
        assert layer.received is not None
        n = layer.buffer.length
        seen_by = torch.arange(n, 0, -1, dtype=torch.float32)  # queries at or after each key's position
        return (layer.received / seen_by / layer.info.group_size)[None]
