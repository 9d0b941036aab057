"""PyramidKV: SnapKV's scores with a per-layer budget falling linearly from the first layer to the last."""

from __future__ import annotations

from dataclasses import dataclass

from tiermem.errors import TiermemError
from tiermem.memory.scorer import WindowScorerPolicy


def pyramid_budgets(budget: int, context: int, num_layers: int, window: int, beta: int) -> list[int]:
    """Tokens kept by each of ``num_layers`` layers, first to last, averaging ``budget`` (kvpress's formula).

    The budgets fall linearly from ``max_num`` to ``min_num = budget / beta`` with ``max_num + min_num = 2 * budget``
    (``max_num`` capped at ``context - window``). Where the pyramid does not fit (``min_num < window``, or one
    layer), every layer keeps ``budget``, as kvpress falls back to SnapKV. Rounded so the sum is exactly
    ``budget * num_layers`` (kvpress rounds each layer, so its sum can be off by a few tokens).
    """
    min_num = budget / beta
    max_num = 2 * budget - min_num
    if max_num >= context - window:
        max_num = context - window
        min_num = 2 * budget - max_num
    if num_layers == 1 or not context >= max_num >= min_num >= window:
        return [budget] * num_layers
    step = (max_num - min_num) / (num_layers - 1)
    exact = [max_num - i * step for i in range(num_layers)]
    floors = [int(x) for x in exact]
    short = budget * num_layers - sum(floors)  # hand the rounding remainder to the largest fractions
    for i in sorted(range(num_layers), key=lambda i: floors[i] - exact[i])[:short]:
        floors[i] += 1
    return floors


@dataclass
class PyramidKV(WindowScorerPolicy):
    """PyramidKV (Cai et al., arXiv 2406.02069), as kvpress's PyramidKVPress: SnapKV's scores (observation window of
    ``window_size`` queries, average pooling of ``kernel_size``), but lower layers keep more tokens than higher
    ones: per-layer budgets fall linearly with steepness ``beta`` and average the uniform budget, so the model holds
    as many tokens as uniform SnapKV in all. Each layer's block is shrunk to its own budget. Defaults are kvpress's
    (window 64, kernel 5, beta 20; the paper's code uses window 8 and max pooling of 7).

    Departures from kvpress: the pyramid runs over the layers that are compressed (Gemma3's global layers), not over
    all layer indices, so the budgets still average the uniform one; budgets are rounded to sum exactly.
    """

    name = "pyramidkv"
    paper = "PyramidKV, arXiv 2406.02069"
    beta: int = 20

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise TiermemError("pyramidkv needs beta >= 1")
        super().__post_init__()

    def layer_budget(self, context_tokens: int, rank: int, num_scored: int) -> int:
        budget = self.budget_for(context_tokens)
        return pyramid_budgets(budget, context_tokens, num_scored, self.window_size, self.beta)[rank]

    def largest_layer_budget(self, context_tokens: int) -> int:
        return self.layer_budget(context_tokens, 0, 2)
