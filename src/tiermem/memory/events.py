"""Event boundaries for EM-LLM: surprise thresholding and graph-theoretic refinement.

Pure functions plus one small state object; the EM-LLM policy and the tests both use them.
"""

from __future__ import annotations

import torch


def surprise_boundaries(surprise: torch.Tensor, history: torch.Tensor, gamma: float) -> torch.Tensor:
    """Tokens whose surprise exceeds ``mean + gamma * std`` of ``history`` (EM-LLM, Eq. 1).

    ``surprise`` (T,): -log p(token | prefix) of the new tokens. ``history``: the surprise of the tokens before them
    within the local window; when it has fewer than two values, the new tokens' own statistics are used (as the
    reference does for the first chunk).
    """
    reference = history if history.numel() >= 2 else surprise
    if reference.numel() < 2:
        return torch.zeros_like(surprise, dtype=torch.bool)
    return surprise > reference.mean() + gamma * reference.std()


def modularity_of_splits(adjacency: torch.Tensor) -> torch.Tensor:
    """Modularity of splitting nodes ``0..n-1`` into ``[0, t)`` and ``[t, n)``, for every t in 1..n-1.

    Newman modularity Q = sum_c (A_cc - k_c k_c^T / 2m) / (4m), as the reference's ``modularity`` with its
    normalisation, computed for all split points at once from prefix sums. Returns (n - 1,).
    """
    a = adjacency.double()
    n = a.shape[0]
    m = a.sum() / 2
    prefix = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    prefix[1:, 1:] = a.cumsum(0).cumsum(1)
    degree = a.sum(dim=1).cumsum(0)
    t = torch.arange(1, n)
    inner_first = prefix[t, t]  # sum of A over [0,t) x [0,t)
    inner_second = prefix[n, n] - 2 * prefix[t, n] + prefix[t, t]  # over [t,n) x [t,n) (A symmetric)
    k_first = degree[t - 1]
    k_second = degree[-1] - k_first
    expected = (k_first**2 + k_second**2) / (2 * m)
    return ((inner_first + inner_second - expected) / (4 * m)).float()


def conductance_of_splits(adjacency: torch.Tensor) -> torch.Tensor:
    """Conductance of each split ``[0, t) | [t, n)``, t in 1..n-1 (lower is a better boundary).

    As the reference: for each side S, cut(S) / min(W(S), total - W(S)) with W the weight inside S; the split's
    value is the smaller of its two sides'.
    """
    a = adjacency.double()
    n = a.shape[0]
    prefix = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    prefix[1:, 1:] = a.cumsum(0).cumsum(1)
    t = torch.arange(1, n)
    total = prefix[n, n]
    inner_first = prefix[t, t]
    inner_second = total - 2 * prefix[t, n] + inner_first
    cut = prefix[t, n] - inner_first  # [0,t) x [t,n)
    first = cut / torch.minimum(inner_first, total - inner_first).clamp_min(1e-15)
    second = cut / torch.minimum(inner_second, total - inner_second).clamp_min(1e-15)
    return torch.minimum(first, second).float()


def refine_boundaries(boundaries: list[int], adjacency: torch.Tensor, metric: str, min_size: int) -> list[int]:
    """Move each boundary to the best split between the previous boundary and itself (EM-LLM, Sec. 3.2).

    For a boundary b after boundary p, the search window is [p - h, b + h) with h half the event size; inside it,
    the split t in [p + min_size, b] that maximises modularity (or minimises conductance) of the two sides wins.
    ``adjacency`` (n, n) is the key-similarity graph of the tokens the boundaries index.
    """
    refined: list[int] = []
    previous = 0
    for boundary in boundaries:
        if boundary - previous <= min_size:
            refined.append(boundary)
            previous = boundary
            continue
        half = (boundary - previous) // 2
        lo, hi = max(0, previous - half), min(adjacency.shape[0], boundary + half)
        window = adjacency[lo:hi, lo:hi]
        if window.shape[0] < 2:
            refined.append(boundary)
            previous = boundary
            continue
        scores = modularity_of_splits(window) if metric == "modularity" else -conductance_of_splits(window)
        first, last = previous + min_size - lo, boundary - lo  # candidate split points, relative to lo
        candidates = scores[first - 1 : last - 1]  # scores[i] is the split at t = i + 1; t in [first, last)
        best = previous + min_size + int(candidates.argmax()) if candidates.numel() else boundary
        refined.append(best)
        previous = best
    return refined


class EventBoundaries:
    """Surprise and boundary flags of every token seen so far, by absolute position (shared by a model's layers)."""

    def __init__(self, gamma: float, window: int):
        self.gamma = gamma
        self.window = window
        self.surprise = torch.empty(0)
        self.flags = torch.empty(0, dtype=torch.bool)

    def add(self, surprise: torch.Tensor) -> torch.Tensor:
        """Append the surprise of the next tokens; returns their boundary flags."""
        history = self.surprise[-self.window :]
        flags = surprise_boundaries(surprise, history, self.gamma)
        self.surprise = torch.cat([self.surprise, surprise.float()])
        self.flags = torch.cat([self.flags, flags])
        return flags

    def set_flags(self, start: int, flags: torch.Tensor) -> None:
        self.flags[start : start + flags.numel()] = flags

    def between(self, start: int, end: int) -> torch.Tensor:
        """Flags of positions start..end-1 (False where no surprise was observed)."""
        out = torch.zeros(end - start, dtype=torch.bool)
        known = self.flags[start:end]
        out[: known.numel()] = known
        return out
