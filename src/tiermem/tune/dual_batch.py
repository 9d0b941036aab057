"""The streamed ZO step's doubled batch: rows ``[:B]`` are the +ε pass, rows ``[B:]`` the −ε pass (ZO2's dual forward).

Splitting a layer call's arguments into the two halves and joining the outputs, and the −ε rows of the input
embedding that the batch looks up (:func:`add_noise_keeping_rows`), so the streamed runner
(:mod:`tiermem.tune.stream`) holds the resident group once instead of a −ε copy of it.
"""

from __future__ import annotations

from typing import Any

import torch

from tiermem.tune.perturb import CHUNK, GAUSSIAN, Noise


def _halves(value: Any, rows: int) -> tuple[Any, Any]:
    """Split a tensor whose first dimension is the doubled batch (or a tuple of such) into its two halves."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 2 * rows:
        return value[:rows], value[rows:]
    if isinstance(value, tuple) and any(torch.is_tensor(v) for v in value):
        pairs = [_halves(v, rows) for v in value]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return value, value


def split_call(args: tuple[Any, ...], kwargs: dict[str, Any], rows: int) -> list[tuple[tuple[Any, ...], dict]]:
    """The (args, kwargs) of the +ε rows and of the −ε rows of a layer call on the doubled batch."""
    arg_pairs = [_halves(a, rows) for a in args]
    kw_pairs = {k: _halves(v, rows) for k, v in kwargs.items()}
    return [(tuple(p[half] for p in arg_pairs), {k: p[half] for k, p in kw_pairs.items()}) for half in (0, 1)]


@torch.no_grad()
def add_noise_keeping_rows(
    param: torch.Tensor, seed: int, name: str, scale: float, rows: torch.Tensor, source: Noise = GAUSSIAN
) -> torch.Tensor:
    """:func:`add_noise_` on ``param`` (V, H), returning z's rows ``rows`` (sorted, shape (n,)) as an (n, H) tensor.

    The same chunks and the same ``add_`` as :func:`add_noise_` (keep the two loops alike), so ``param`` ends bitwise
    as it would there; the z rows are picked out of each chunk as it goes by, with no second draw.
    """
    width, flat = param.shape[-1], param.view(-1)
    elements = (rows[:, None] * width + torch.arange(width)).reshape(-1)  # sorted: rows are
    taken = torch.empty(elements.numel(), dtype=param.dtype)
    for c, start in enumerate(range(0, flat.numel(), CHUNK)):
        piece = flat[start : start + CHUNK]
        z = source.chunk(seed, name, c, piece.numel(), param.dtype)
        piece.add_(z, alpha=scale)
        lo, hi = torch.searchsorted(elements, torch.tensor([start, start + piece.numel()])).tolist()
        taken[lo:hi] = z[elements[lo:hi] - start]
    return taken.view(-1, width)


def join(first: Any, second: Any) -> Any:
    if torch.is_tensor(first):
        return torch.cat([first, second])
    if isinstance(first, tuple):
        return tuple(join(a, b) for a, b in zip(first, second, strict=True))
    return first
