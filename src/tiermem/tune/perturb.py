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

Drawing z costs more than the step's forward passes on a CPU: PyTorch's ``randn`` draws about 100 M float32 values
per second on one core (its Mersenne Twister is scalar), so the four passes over SmolLM2's 135 M weights of a MeZO
step (+ε, −2ε, restore, update) take ~5 s against ~3.5 s for its two forwards. :class:`NoiseTable` (``--zo-noise
table``, a named option; MeZO's Gaussian draw stays the default) is the shared noise table of evolution strategies
(Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement Learning", 2017, section 2.1): one
table of i.i.d. N(0, 1) values is drawn once, and each chunk of z is a window of it at an offset, with a sign,
drawn from (step seed, tensor name, chunk index); a perturbation is then one ``add_`` reading memory. Each element
of z is still N(0, 1), and distinct chunks of one direction are uncorrelated in expectation over the random signs;
what is lost is independence between chunks whose windows overlap (they share values, up to sign).

:class:`SparseNoise` (``--zo-sparsity s``, a named option) is ZO-Bench's gradient sparsity (Zhang et al. 2024, one
of its three extensions; ``gradient_sparsity`` in its code): each tensor's z is zero outside a random share
``1 − s`` of its coordinates, so a step explores a subspace of ``(1 − s)·d`` dimensions instead of all ``d``.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable
from typing import Protocol

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


class Noise(Protocol):
    """Where z comes from: a chunk of z as a new tensor, or added in place (which may skip materialising it)."""

    kind: str

    def chunk(self, seed: int, name: str, chunk: int, numel: int, dtype: torch.dtype) -> torch.Tensor: ...

    def add_(self, piece: torch.Tensor, seed: int, name: str, chunk: int, scale: float) -> None: ...


class GaussianNoise:
    """MeZO's directions: each chunk drawn fresh from its own seeded generator (:func:`chunk_noise`)."""

    kind = "gaussian"

    def chunk(self, seed: int, name: str, chunk: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return chunk_noise(seed, name, chunk, numel, dtype)

    def add_(self, piece: torch.Tensor, seed: int, name: str, chunk: int, scale: float) -> None:
        """``piece += scale · z``; ``piece`` is the chunk's slice of a tensor, shape ``(numel,)``."""
        piece.add_(chunk_noise(seed, name, chunk, piece.numel(), piece.dtype), alpha=scale)


class NoiseTable:
    """Evolution strategies' shared noise table: z's chunks are signed windows of one fixed N(0, 1) table.

    ``elements`` float32 values (default 2**24: 64 MiB) drawn once per process from a fixed seed, so every run and
    every resumed run sees the same table. The window of chunk ``c`` of tensor ``name`` at step seed ``s`` starts at
    an offset, and carries a sign, both from SplitMix64 of (s, name, c): a pure function, as for the Gaussian draw,
    so streamed and resident runs stay bitwise equal. ``add_`` reads the window in place (no copy).
    """

    kind = "table"
    SEED = 0x7AB1E

    def __init__(self, elements: int = 1 << 24):
        if elements < CHUNK:
            raise ValueError(f"a noise table needs at least one chunk ({CHUNK} elements), got {elements}")
        self.table = _table(elements)

    def _window(self, seed: int, name: str, chunk: int, numel: int) -> tuple[torch.Tensor, float]:
        draw = _mix(seed, tensor_key(name), chunk, 0x7AB1E)
        offset = (draw >> 1) % (self.table.numel() - numel + 1)
        return self.table[offset : offset + numel], (-1.0 if draw & 1 else 1.0)

    def chunk(self, seed: int, name: str, chunk: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        window, sign = self._window(seed, name, chunk, numel)
        z = torch.mul(window, sign)  # a new tensor: callers may scale it in place
        return z if dtype == torch.float32 else z.to(dtype)

    def add_(self, piece: torch.Tensor, seed: int, name: str, chunk: int, scale: float) -> None:
        """``piece += scale · z``, bitwise what adding :meth:`chunk` gives (a sign flip is exact)."""
        window, sign = self._window(seed, name, chunk, piece.numel())
        piece.add_(window if piece.dtype == torch.float32 else window.to(piece.dtype), alpha=scale * sign)


@functools.lru_cache(maxsize=2)
def _table(elements: int) -> torch.Tensor:
    """The table itself, shared by every :class:`NoiseTable` of this size in the process."""
    return torch.randn(elements, generator=torch.Generator().manual_seed(NoiseTable.SEED), dtype=torch.float32)


class SparseNoise:
    """ZO-Bench's gradient sparsity with one mask for the whole run: z is ``base``'s z, zero outside a kept share.

    The kept coordinates of chunk ``c`` of tensor ``name`` are those where a window of the shared N(0, 1) table (at
    an offset from SplitMix64 of (``mask_seed``, name, c)) is at least Φ⁻¹(s): each coordinate is kept with
    probability ``1 − s``, the mask costs one comparison per element and no memory beyond the table, and it depends
    on the run seed only, so every step, the resumed run and the streamed run see the same mask.

    Departures from ZO-Bench (``zo-bench/trainer.py``, ``fast_random_mask_like``), and why: ZO-Bench redraws its
    mask every ``sparse_gradient_resample_steps`` steps (default 1; its SST-2 grid runs 1 to 20,000, the last one
    mask for the whole run). The mask here is fixed for the run: a fresh mask every step gives the same expected
    update as the dense step at lr·(1 − s), with noise of the same relative size (E[z_m z_mᵀ] = (1 − s)·I: an
    argument, not measured here), while a fixed mask cuts the dimension the estimate's variance grows with.
    ZO-Bench zeroes coordinates where a fresh N(0, 1) draw is below ``s`` itself (so Φ(s) of them, 77% for
    s = 0.75: its docstring says the sparsity "is not guaranteed"); here the threshold is Φ⁻¹(s), so the share
    zeroed is ``s``. The mask's windows come from the same table as :class:`NoiseTable`'s z windows, at offsets
    from other hashes: a mask window and a z window coincide with probability ~1/16 M per chunk pair.
    """

    MIX = 0x5A45

    def __init__(self, base: Noise, sparsity: float, mask_seed: int):
        if not 0 < sparsity < 1:
            raise ValueError(f"a sparsity is in (0, 1), got {sparsity}")
        self.base, self.sparsity, self.mask_seed = base, sparsity, mask_seed
        self.kind = base.kind
        self.table = _table(1 << 24)
        self.threshold = float(torch.special.ndtri(torch.tensor(sparsity, dtype=torch.float64)))

    def dropped(self, name: str, chunk: int, numel: int) -> torch.Tensor:
        """True where chunk ``chunk`` of tensor ``name`` is masked out: shape ``(numel,)``, bool."""
        offset = _mix(self.mask_seed, tensor_key(name), chunk, self.MIX) % (self.table.numel() - numel + 1)
        return self.table[offset : offset + numel] < self.threshold

    def chunk(self, seed: int, name: str, chunk: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        z = self.base.chunk(seed, name, chunk, numel, dtype)
        return z.masked_fill_(self.dropped(name, chunk, numel), 0.0)

    def add_(self, piece: torch.Tensor, seed: int, name: str, chunk: int, scale: float) -> None:
        piece.add_(self.chunk(seed, name, chunk, piece.numel(), piece.dtype), alpha=scale)


GAUSSIAN = GaussianNoise()
NOISE_KINDS = ("gaussian", "table")


def make_noise(kind: str, sparsity: float = 0.0, mask_seed: int = 0, table_mib: int = 64) -> Noise:
    """The noise source ``kind`` (``gaussian``: MeZO's; ``table``: a ``table_mib`` MiB shared noise table), masked
    to a share ``1 − sparsity`` of each tensor's coordinates (fixed by ``mask_seed``) when ``sparsity`` > 0."""
    if kind == "gaussian":
        base: Noise = GAUSSIAN
    elif kind == "table":
        base = NoiseTable(table_mib * (1 << 20) // 4)
    else:
        raise ValueError(f"unknown noise source {kind}: use one of {', '.join(NOISE_KINDS)}")
    return SparseNoise(base, sparsity, mask_seed) if sparsity else base


def noise(seed: int, name: str, like: torch.Tensor, source: Noise = GAUSSIAN) -> torch.Tensor:
    """The whole z of one tensor (shape of ``like``); used by tests and by optimizers that need it at once."""
    flat = like.reshape(-1)
    parts = [
        source.chunk(seed, name, c, min(CHUNK, flat.numel() - c * CHUNK), like.dtype)
        for c in range((flat.numel() + CHUNK - 1) // CHUNK)
    ]
    return torch.cat(parts).reshape(like.shape) if parts else torch.empty_like(like)


@torch.no_grad()
def add_noise_(param: torch.Tensor, seed: int, name: str, scale: float, source: Noise = GAUSSIAN) -> None:
    """``param += scale · z`` in place, one chunk of z at a time (MeZO's ``zo_perturb_parameters``)."""
    flat = param.view(-1)  # parameters are contiguous; view (not reshape) so the update lands in param itself
    for c, start in enumerate(range(0, flat.numel(), CHUNK)):
        source.add_(flat[start : start + CHUNK], seed, name, c, scale)


@torch.no_grad()
def perturb_(named: Iterable[tuple[str, torch.Tensor]], seed: int, scale: float, source: Noise = GAUSSIAN) -> None:
    """``θ += scale · z(seed)`` for every named tensor; ``scale`` is ``+ε``, ``−2ε`` or ``+ε`` in a MeZO step."""
    for name, param in named:
        add_noise_(param, seed, name, scale, source)
