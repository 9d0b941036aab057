"""TOVA: keep the tokens the last context token attends to, averaged over all heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.memory.scorer import ScorerLayer, ScorerPolicy, window_attention


@dataclass
class TOVA(ScorerPolicy):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104), as kvpress's TOVAPress: score =
    the softmax attention of the last context token, averaged over all query heads of the layer (one ranking for the
    whole layer), broadcast to every KV head. The last token itself is always kept (kvpress pads it with max + 1).

    Departures from the paper: TOVA evicts one token per step as it reads, with the budget reached during decoding;
    here, as in kvpress, it compresses once when the context is in. Logits use the model's attention scaling (kvpress
    uses 1/sqrt(head_dim); they differ only for models with another scale, e.g. Gemma's query_pre_attn_scalar).
    """

    name = "tova"
    paper = "TOVA, arXiv 2401.06104"

    def query_window(self) -> int:
        return 1

    def protect_last(self) -> int:
        return 1

    def fixed_parts(self) -> str:
        return "last token"

    def score(self, layer: ScorerLayer) -> torch.Tensor:
        assert layer.window_queries is not None
        probs = window_attention(layer.window_queries, layer.buffer.view()[0], layer.info.scaling)  # (1, Hq, 1, S)
        return probs.mean(dim=(1, 2))[:, None].expand(1, layer.info.num_kv_heads, -1)
