"""Which stored keys each query may read: the causal rule and the sliding window, by position."""

from __future__ import annotations

import torch

from tiermem.layer_info import LayerInfo


def visible_keys(
    q_pos: torch.Tensor, k_pos: torch.Tensor, info: LayerInfo, past_only: bool = False
) -> torch.Tensor | None:
    """Mask (T, S) of the keys at positions ``k_pos`` (S,) each query at ``q_pos`` (T,) sees, or None when every
    query sees them all.

    ``past_only``: the caller knows every key sits at or before the query (a full-attention layer's decode step over
    its own tokens), so a single query without a sliding window skips the check (a comparison, an ``all`` and a
    sync per layer and step).
    """
    if past_only and q_pos.shape[0] == 1 and info.sliding_window is None:
        return None
    visible = k_pos[None, :] <= q_pos[:, None]
    if info.sliding_window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - info.sliding_window
    return None if bool(visible.all()) else visible
