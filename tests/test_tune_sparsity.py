"""ZO-Bench's gradient sparsity with one mask per run (``--zo-sparsity``): z is zero on the asked share of
coordinates, the same ones at every step, those coordinates never move, and streamed runs stay bitwise resident."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tune_fixtures import make_tiny_tune_model
from tiermem.cli import main
from tiermem.errors import TiermemError
from tiermem.tune import TuneConfig, tune
from tiermem.tune.perturb import CHUNK, GAUSSIAN, NoiseTable, SparseNoise, make_noise, noise
from tiermem.tune.zo import ZOHyper, ZOOptimizer


@pytest.mark.parametrize("base", ["gaussian", "table"])
def test_mask_is_fixed_for_the_run_and_drops_the_asked_share(base: str) -> None:
    source = make_noise(base, sparsity=0.75, mask_seed=3)
    like = torch.zeros(CHUNK + 5000)  # two chunks, the second short
    first, second = noise(1, "w", like, source), noise(2, "w", like, source)
    dropped = first == 0
    assert torch.equal(dropped, second == 0)  # the same coordinates at every step
    assert float(dropped.float().mean()) == pytest.approx(0.75, abs=0.005)
    dense = make_noise(base)
    assert torch.equal(first[~dropped], noise(1, "w", like, dense)[~dropped])  # kept: the dense direction itself
    other_run = noise(1, "w", like, make_noise(base, sparsity=0.75, mask_seed=4))
    assert not torch.equal(dropped, other_run == 0)  # another run seed, another mask
    assert not torch.equal(dropped, noise(1, "v", like, source) == 0)  # another tensor, another mask


def test_a_sparse_step_moves_only_the_kept_coordinates() -> None:
    param = torch.randn(CHUNK + 77)
    start = param.clone()
    target = torch.randn_like(param)
    source = SparseNoise(NoiseTable(2 * CHUNK), 0.9, mask_seed=0)
    zo = ZOOptimizer("zo-sgd", ZOHyper(lr=1e-3, eps=1e-3), noise=source)
    _, _, g = zo.step([("w", param)], 5, lambda: float(((param - target) ** 2).sum()))
    kept = noise(5, "w", param, source) != 0
    assert abs(g) > 1.0
    assert torch.equal(param[~kept], start[~kept])  # +ε·0, −2ε·0, +ε·0 and −lr·g·0: bitwise unchanged
    assert bool((param[kept] != start[kept]).float().mean() > 0.99)
    assert float(kept.float().mean()) == pytest.approx(0.1, abs=0.005)


def test_sparse_runs_stream_as_resident_and_resume_only_with_the_same_mask(tmp_path: Path) -> None:
    model = make_tiny_tune_model(tmp_path / "model", layers=2, tied=True)
    settings: dict[str, object] = dict(
        model=str(model), method="zo-sgd", task="polarity-k16", steps=3, lr=1e-2, batch_size=4, save_model=False
    )
    resident = tune(TuneConfig(**settings, zo_sparsity=0.5, out=tmp_path / "r"))  # type: ignore[arg-type]
    stream = tune(TuneConfig(**settings, zo_sparsity=0.5, weights="stream", out=tmp_path / "s"))  # type: ignore[arg-type]
    dense = tune(TuneConfig(**settings))  # type: ignore[arg-type]
    assert stream.losses == resident.losses and stream.loss_after == resident.loss_after
    assert resident.losses[1:] != dense.losses[1:]
    assert resident.zo_sparsity == 0.5 and dense.zo_sparsity == 0.0
    more = dict(settings, steps=4, resume=True, out=tmp_path / "r")
    with pytest.raises(TiermemError, match="zo_sparsity"):
        tune(TuneConfig(**more, zo_sparsity=0.25))  # type: ignore[arg-type]
    assert tune(TuneConfig(**more, zo_sparsity=0.5)).resumed_from == 3  # type: ignore[arg-type]


def test_bad_sparsity_gets_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("1", "-0.1"):
        assert main(["tune", "--zo-sparsity", value, "--steps", "1"]) != 0
        err = capsys.readouterr().err.strip()
        assert "--zo-sparsity is a share of coordinates in [0, 1)" in err and len(err.splitlines()) == 1
    assert main(["tune", "--method", "adamw", "--zo-sparsity", "0.5", "--steps", "1"]) != 0
    assert "--zo-sparsity applies to zeroth-order methods" in capsys.readouterr().err
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        SparseNoise(GAUSSIAN, 1.0, 0)
