"""Knorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.memory.scorer import ScorerLayer, ScorerPolicy


@dataclass
class Knorm(ScorerPolicy):
    """Knorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024,
    arXiv 2406.11430), as kvpress's KnormPress: score = -||k||, so keys with a low norm (which draw high attention,
    the paper's observation) are kept; no queries are needed, so it is question-agnostic by construction.

    Departures from kvpress: none in the score. As with every scorer here, the kept tokens stay in position order
    and the block is shrunk to the budget (kvpress gathers in score order).
    """

    name = "knorm"
    paper = "Knorm, arXiv 2406.11430"

    def score(self, layer: ScorerLayer) -> torch.Tensor:
        keys = layer.buffer.view()[0]  # rotated; RoPE is a rotation, so the norm is the pre-RoPE key's
        return -keys.float().norm(dim=-1)
