"""Rewinding a stored session to the prefix a new request shares with it: the longest common prefix of two id
arrays, and whether (and how) a cache can drop its tokens past a position and be exactly what a shorter run built."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tiermem.cache import TierCache
from tiermem.memory.layer import DenseLayer, SlidingWindowLayer


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two id sequences, compared element by element."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def truncatable(cache: TierCache, n: int) -> bool:
    """Whether every layer can drop its tokens from position ``n`` on and be exactly what a run over the first
    ``n`` tokens would have built: dense full-attention layers that evicted nothing, sliding-window layers that
    still hold the window before ``n``, and no blocks in the store."""
    if cache.store._counts:
        return False
    for layer in cache.tier_layers:
        if type(layer) is DenseLayer:
            if layer.buffer.length != layer.seen:  # nothing evicted, so slot i holds position i
                return False
        elif type(layer) is SlidingWindowLayer:
            assert layer.info.sliding_window is not None
            first = int(layer.buffer.positions[0, 0]) if layer.buffer.length else 0
            if first > max(0, n - layer.info.sliding_window + 1):
                return False
        else:
            return False
    return True


def truncate(cache: TierCache, n: int) -> None:
    """Drop every token at position ``n`` or later (call :func:`truncatable` first)."""
    for layer in cache.tier_layers:
        assert isinstance(layer, DenseLayer)
        buffer = layer.buffer
        buffer.length = int((buffer.positions[0, : buffer.length] < n).sum())
        layer.seen = n
        layer.report()
