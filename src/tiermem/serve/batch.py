"""Batched decoding across sessions: one forward for the next token of every running turn.

The linear layers (projections, MLPs, the LM head) run once for the whole batch; attention runs per row, each row
under its own session's :class:`TierCache` and policy state (``tiermem.attention`` splits the batch when the cache
has ``rows``). Rows sit at different positions, which is fine: tiermem layers rotate by their own ``seen`` count and
mask by position, so no padding and no attention mask are needed.

Where the model and every row's policy allow it, the step is tiermem's fused decode step
(:mod:`tiermem.decode_step`: one compiled call for the batch, each weight read once for all rows); otherwise the
model's forward.

Prefill stays one session at a time (prompts differ in length; chunked prefill already bounds its activations).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from tiermem.cache import TierCache
from tiermem.decode_step import FusedDecoder, cache_reason
from tiermem.engine import forward
from tiermem.models import LoadedModel


class BatchCache(Cache):
    """The ``cache=`` of a batched forward: one :class:`TierCache` per batch row, in row order."""

    def __init__(self, rows: list[TierCache]):
        self.rows = rows
        # transformers asks the container for lengths and mask sizes; row 0 answers (no mask is ever built:
        # the attention implementation is tiermem's, registered without a mask function)
        super().__init__(layers=list(rows[0].tier_layers))


def decode_step(
    lm: LoadedModel, caches: list[TierCache], tokens: list[int], fused: FusedDecoder | None = None
) -> torch.Tensor:
    """Feed one token to each cache, all in one step; the next-token logits (B, vocab) in float32. ``fused`` (the
    model's :func:`tiermem.decode_step.fused_decoder`, checked once for the model) runs the step when every row's
    cache allows it (:func:`tiermem.decode_step.cache_reason`, checked every step: a session's policy may compress
    or change)."""
    if fused is not None and not any(map(cache_reason, caches)):
        return fused.step(caches, tokens)
    model = lm.model
    if len(caches) == 1:
        return forward(model, caches[0], torch.tensor([tokens]))[None]
    ids = torch.tensor(tokens).unsqueeze(1)  # (B, 1)
    positions = torch.tensor([c.get_seq_length() for c in caches]).unsqueeze(1)
    out = model(input_ids=ids, position_ids=positions, cache=BatchCache(caches), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()
