"""Which subspace should full-parameter MeZO explore? Two probes beside ``--zo-sparsity`` (a random fixed mask).

``tune_probe.py``'s run (dev split, keep-best, test once) with the ZO directions restricted in one of two ways that
``tiermem tune`` does not offer, to test why full-parameter MeZO trails LoRA on ``polarity-k16``:

- ``--subspace magnitude --sparsity s``: Sparse MeZO's selection (Liu et al., "Sparse MeZO: Less Parameters for
  Better Performance in Zeroth-Order LLM Fine-Tuning", 2024): z only on the weights whose magnitude is at most a
  per-tensor threshold, here the (1 − s) quantile of |θ| estimated on 10⁶ sampled elements of the pretrained
  tensor. Departure: the mask is taken once from the pretrained weights and held (as float, one per chunk: ~540 MB
  for SmolLM2, so peak RSS is not comparable), where Sparse MeZO recomputes it from the current weights.
- ``--subspace no-embedding``: every tensor except the tied embedding / LM head (106.2 M of SmolLM2's 134.5 M).

Both use the shared noise table. One JSON line per run is appended to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/tune_subspace_probe.py --subspace magnitude --sparsity 0.9 \\
        --method zo-sgd --lr 3e-4 --eps 1e-3 --zo-noise table --steps 100 --batch-size 8 --seed 0 \\
        --eval-every 20 --keep-best --test --out bench-out/tune-probe/subspace.jsonl
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import tune_probe

from tiermem.tune.config import TuneConfig
from tiermem.tune.perturb import CHUNK, NoiseTable


class MagnitudeMaskedTable(NoiseTable):
    """The noise table's z, zero wherever the pretrained |θ| is above its tensor's threshold."""

    def __init__(self, sparsity: float):
        super().__init__()
        self.sparsity = sparsity
        self.start: dict[str, torch.Tensor] = {}
        self.threshold: dict[str, float] = {}
        self.masks: dict[tuple[str, int], torch.Tensor] = {}

    def fit(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Thresholds from the pretrained tensors: the (1 − s) quantile of |θ| on 10⁶ sampled elements."""
        for name, param in named:
            flat = param.detach().reshape(-1).abs()
            sampler = torch.Generator().manual_seed(0)
            picks = torch.randint(0, flat.numel(), (min(flat.numel(), 1_000_000),), generator=sampler)
            self.threshold[name] = torch.quantile(flat[picks].float(), 1 - self.sparsity).item()
            self.start[name] = param.detach().clone()

    def mask(self, name: str, chunk: int, numel: int) -> torch.Tensor:
        if (name, chunk) not in self.masks:
            piece = self.start[name].reshape(-1)[chunk * CHUNK : chunk * CHUNK + numel]
            self.masks[name, chunk] = (piece.abs() <= self.threshold[name]).float()
        return self.masks[name, chunk]

    def chunk(self, seed: int, name: str, chunk: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return super().chunk(seed, name, chunk, numel, dtype).mul_(self.mask(name, chunk, numel))

    def add_(self, piece: torch.Tensor, seed: int, name: str, chunk: int, scale: float) -> None:
        window, sign = self._window(seed, name, chunk, piece.numel())
        piece.add_(window * self.mask(name, chunk, piece.numel()), alpha=scale * sign)


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--subspace", choices=["magnitude", "no-embedding"], default="magnitude")
    own.add_argument("--sparsity", type=float, default=0.9, help="magnitude: share of each tensor left out")
    known, sys.argv[1:] = own.parse_known_args()  # the rest are tune_probe.py's options
    subspace, sparsity = known.subspace, known.sparsity
    args = tune_probe.parse()
    source = MagnitudeMaskedTable(sparsity)
    original = tune_probe._make_runner

    def make_runner(config: TuneConfig, objective: Any) -> Any:
        runner, made = original(config, objective)
        if subspace == "magnitude":
            source.fit(runner.named)
        else:
            runner.named = [(n, p) for n, p in runner.named if "embed" not in n and "lm_head" not in n]
        return runner, made

    if subspace == "magnitude":
        TuneConfig.noise = lambda self: source  # type: ignore[method-assign]
    tune_probe._make_runner = make_runner  # type: ignore[assignment]
    args.tag = f"{subspace}{sparsity if subspace == 'magnitude' else ''}" + (f"-{args.tag}" if args.tag else "")
    record = tune_probe.run(args)
    record.update(subspace=subspace, sparsity=sparsity if subspace == "magnitude" else None)
    tune_probe.save_record(args.out, record)


if __name__ == "__main__":
    main()
