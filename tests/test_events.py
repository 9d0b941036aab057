"""EM-LLM's event segmentation: surprise thresholds, refinement metrics, and the engine's surprise."""

from __future__ import annotations

import torch

from tiermem.engine import surprise
from tiermem.memory.events import (
    EventBoundaries,
    conductance_of_splits,
    modularity_of_splits,
    refine_boundaries,
    surprise_boundaries,
)


def test_threshold_is_mean_plus_gamma_std_of_the_history() -> None:
    history = torch.tensor([1.0, 2.0, 3.0, 2.0])  # mean 2, std 0.8165 (unbiased, as torch.std and the reference)
    new = torch.tensor([2.5, 2.9, 4.0, 1.0])
    assert surprise_boundaries(new, history, gamma=1.0).tolist() == [False, True, True, False]
    assert surprise_boundaries(new, history, gamma=2.0).tolist() == [False, False, True, False]
    # Without history (the first chunk) the chunk's own statistics are used.
    first = torch.tensor([1.0, 1.0, 1.0, 9.0])
    assert surprise_boundaries(first, torch.empty(0), gamma=1.0).tolist() == [False, False, False, True]


def test_boundaries_accumulate_by_position() -> None:
    events = EventBoundaries(gamma=1.0, window=4)
    events.add(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 5.0]))
    flags = events.add(torch.tensor([1.0, 1.0, 30.0]))  # history: the last 4 values (1, 1, 1, 5)
    assert flags.tolist() == [False, False, True]
    assert events.between(4, 12).tolist() == [False, True, False, False, True, False, False, False]


def brute_force_modularity(a: torch.Tensor, t: int) -> float:
    m = a.sum() / 2
    k = a.sum(dim=1)
    total = 0.0
    for community in (range(0, t), range(t, a.shape[0])):
        idx = torch.tensor(list(community))
        total += float((a[idx][:, idx] - torch.outer(k[idx], k[idx]) / (2 * m)).sum())
    return total / float(4 * m)


def test_split_metrics_match_their_definitions() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen)
    a = (x @ x.T).abs()
    fast = modularity_of_splits(a)
    for t in range(1, 12):
        assert abs(float(fast[t - 1]) - brute_force_modularity(a, t)) < 1e-5
    block = torch.zeros(10, 10)
    block[:4, :4] = 1.0
    block[4:, 4:] = 1.0
    block += 0.01
    assert int(modularity_of_splits(block).argmax()) + 1 == 4
    assert int(conductance_of_splits(block).argmin()) + 1 == 4


def test_refinement_moves_a_boundary_to_the_community_edge() -> None:
    a = torch.full((40, 40), 0.01)
    a[:10, :10] = a[10:25, 10:25] = a[25:, 25:] = 1.0
    assert refine_boundaries([13, 28], a, "modularity", min_size=2) == [10, 25]
    assert refine_boundaries([13, 28], a, "conductance", min_size=2) == [10, 25]


def test_engine_surprise_is_negative_log_probability() -> None:
    gen = torch.Generator().manual_seed(1)
    previous, logits = torch.randn(11, generator=gen), torch.randn(4, 11, generator=gen)
    ids = torch.tensor([3, 7, 0, 9])
    expected = [-float(previous.log_softmax(0)[3])] + [
        -float(logits[i - 1].log_softmax(0)[ids[i]]) for i in range(1, 4)
    ]
    assert torch.allclose(surprise(previous, logits, ids), torch.tensor(expected), atol=1e-5)
    assert surprise(None, logits, ids)[0] == 0  # the first token of the text has nothing to be surprised against
