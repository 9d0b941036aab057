"""MeZO's seed trick: a random direction z that is never stored, regenerated from a seed each time it is needed.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023) perturbs every trained
tensor in place, ``θ += s·ε·z`` with ``z ~ N(0, I)``, and recovers the same ``z`` for the −ε pass, the restore and the
update by re-seeding the random generator, so a step stores one seed and one scalar.

Departure from the reference code (``large_models/trainer.py``), and why: MeZO calls ``torch.manual_seed(seed)`` once
and draws each parameter's whole ``z`` from the global generator in ``named_parameters`` order. Here every chunk of
``CHUNK`` elements of every tensor gets its own ``torch.Generator`` seeded from (step seed, tensor name, chunk index).
The directions have the same distribution (i.i.d. standard normal), but

- a tensor's ``z`` does not depend on the order in which tensors are visited, so a layer streamed from disk alone
  (``--weights stream``, ZO2-style) gets exactly the ``z`` the resident model gets, and the two runs are bitwise
  equal;
- the extra memory is one chunk (4 MiB in float32) rather than one whole tensor (SmolLM2's tied embedding is 113 MB);
- the global RNG is left alone, so dropout or sampling elsewhere does not shift the directions.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch

CHUNK = 1 << 20  # elements of z drawn per generator: bounds the extra memory of a perturbation to one chunk
_MASK = (1 << 63) - 1


def _mix(*values: int) -> int:
    """SplitMix64 over ``values``: decorrelated 63-bit generator seeds from (seed, tensor, chunk)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & _MASK


def tensor_key(name: str) -> int:
    """A stable integer for a parameter name (CRC32: the same in every process, unlike ``hash``)."""
    return zlib.crc32(name.encode())


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step ``step`` (0-based) of a run: a pure function, so a resumed run draws the same directions."""
    return _mix(run_seed, step, 0x5EED)


def query_seed(seed: int, query: int) -> int:
    """The seed of direction ``query`` (0-based) of an n-SPSA step whose step seed is ``seed``.

    Direction 0 is the step seed itself, so ``n = 1`` draws exactly the directions it drew before n-SPSA existed.
    """
    return seed if query == 0 else _mix(seed, query, 0x0E5A)


def chunk_noise(seed: int, name: str, chunk: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """z for elements ``[chunk·CHUNK, chunk·CHUNK + numel)`` of tensor ``name``: shape ``(numel,)``, N(0, 1).

    Drawn in float32 and cast, so a float16/bfloat16 model sees the rounded values of the same directions.
    """
    generator = torch.Generator().manual_seed(_mix(seed, tensor_key(name), chunk))
    z = torch.randn(numel, generator=generator, dtype=torch.float32)
    return z if dtype == torch.float32 else z.to(dtype)


def noise(seed: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """The whole z of one tensor (shape of ``like``); used by tests and by optimizers that need it at once."""
    flat = like.reshape(-1)
    parts = [
        chunk_noise(seed, name, c, min(CHUNK, flat.numel() - c * CHUNK), like.dtype)
        for c in range((flat.numel() + CHUNK - 1) // CHUNK)
    ]
    return torch.cat(parts).reshape(like.shape) if parts else torch.empty_like(like)


@torch.no_grad()
def add_noise_(param: torch.Tensor, seed: int, name: str, scale: float) -> None:
    """``param += scale · z`` in place, one chunk of z at a time (MeZO's ``zo_perturb_parameters``)."""
    flat = param.view(-1)  # parameters are contiguous; view (not reshape) so the update lands in param itself
    for c, start in enumerate(range(0, flat.numel(), CHUNK)):
        piece = flat[start : start + CHUNK]
        piece.add_(chunk_noise(seed, name, c, piece.numel(), param.dtype), alpha=scale)


@torch.no_grad()
def perturb_(named: Iterable[tuple[str, torch.Tensor]], seed: int, scale: float) -> None:
    """``θ += scale · z(seed)`` for every named tensor; ``scale`` is ``+ε``, ``−2ε`` or ``+ε`` in a MeZO step."""
    for name, param in named:
        add_noise_(param, seed, name, scale)
