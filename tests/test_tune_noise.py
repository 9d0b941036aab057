"""The shared noise table (``--zo-noise table``): its directions are reproducible, N(0, 1), added in place bitwise as
their materialised chunks, and a ZO run on them is still a finite-difference step, streamed as resident."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tune_fixtures import make_tiny_tune_model
from tiermem.cli import main
from tiermem.tune import TuneConfig, tune
from tiermem.tune.objective import Objective
from tiermem.tune.perturb import CHUNK, NoiseTable, add_noise_, make_noise, noise
from tiermem.tune.tasks import load_task, polarity_split
from tiermem.tune.zo import ZOHyper, ZOOptimizer

SMALL = 2 * CHUNK  # an 8 MiB table keeps the tests light; the windows still move and overlap


@pytest.fixture(scope="module")
def table() -> NoiseTable:
    return NoiseTable(SMALL)


def test_table_directions_are_reproducible_and_distinct(table: NoiseTable) -> None:
    like = torch.zeros(CHUNK + 1000)  # two chunks, the second short
    first = noise(7, "w", like, table)
    assert torch.equal(first, noise(7, "w", like, NoiseTable(SMALL)))  # a fresh table object: same values
    assert not torch.equal(first, noise(8, "w", like, table))
    assert not torch.equal(first, noise(7, "v", like, table))
    assert not torch.equal(first[:1000], first[CHUNK:])  # each chunk has its own window


def test_table_chunks_are_fresh_tensors(table: NoiseTable) -> None:
    before = table.table.clone()
    table.chunk(3, "w", 0, 4096, torch.float32).mul_(5.0)  # the zo-mmt/adam rules scale z in place
    assert torch.equal(table.table, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_add_equals_adding_its_chunk_bitwise(table: NoiseTable, dtype: torch.dtype) -> None:
    param = torch.randn(CHUNK + 333).to(dtype)
    expected = param.clone()
    for c, start in enumerate(range(0, param.numel(), CHUNK)):
        piece = expected[start : start + CHUNK]
        piece.add_(table.chunk(11, "layer.w", c, piece.numel(), dtype), alpha=-3e-3)
    add_noise_(param, 11, "layer.w", -3e-3, table)
    assert torch.equal(param, expected)


def test_table_directions_are_standard_normal_and_uncorrelated(table: NoiseTable) -> None:
    like = torch.zeros(4 * CHUNK)
    draws = [noise(seed, "w", like, table) for seed in range(8)]
    z = torch.stack(draws)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert {table._window(seed, "w", 0, 16)[1] for seed in range(32)} == {1.0, -1.0}  # both signs occur
    corr = (z @ z.T) / like.numel()
    off_diagonal = corr - torch.diag(torch.diagonal(corr))
    assert float(torch.diagonal(corr).min()) > 0.98
    # Windows of a 2-chunk table overlap, but with random signs and offsets two directions stay nearly orthogonal.
    assert float(off_diagonal.abs().max()) < 0.6
    assert float(off_diagonal.abs().mean()) < 0.25


def test_zo_step_on_the_table_is_a_finite_difference(tmp_path: Path, table: NoiseTable) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_tune_model(tmp_path / "m", layers=2)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    objective = Objective(load_task("polarity-k16"), AutoTokenizer.from_pretrained(str(folder)))
    batch = objective.batch(polarity_split(16)[0][:4])

    def loss() -> float:
        with torch.inference_mode():
            return float(objective.loss(model, batch))

    named = [(n, p.data) for n, p in model.named_parameters()]
    theta = {n: p.clone() for n, p in named}
    seed, eps, lr = 99, 1e-3, 1e-2
    z = {n: noise(seed, n, p, table) for n, p in named}
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in named:
                p.copy_(theta[n] + sign * eps * z[n])
        losses.append(loss())
    with torch.no_grad():
        for n, p in named:
            p.copy_(theta[n])
    g_hand = (losses[0] - losses[1]) / (2 * eps)
    plus, minus, g = ZOOptimizer("zo-sgd", ZOHyper(lr=lr, eps=eps), noise=table).step(named, seed, loss)
    assert plus == pytest.approx(losses[0], abs=1e-5) and minus == pytest.approx(losses[1], abs=1e-5)
    assert g == pytest.approx(g_hand, rel=1e-2, abs=1e-3) and abs(g) > 1e-3
    for n, p in named:
        assert torch.allclose(p, theta[n] - lr * g * z[n], atol=1e-5), n


def test_n_spsa_on_the_table_averages_its_directions(table: NoiseTable) -> None:
    param = torch.randn(CHUNK + 10)
    start = param.clone()
    zo = ZOOptimizer("zo-sgd", ZOHyper(lr=0.1, eps=1e-3), noise=table)
    zo.update_tensor_average("w", param, [(1, 0.5), (2, -0.25)])
    expected = start - 0.1 * (0.5 * noise(1, "w", start, table) - 0.25 * noise(2, "w", start, table))
    assert torch.allclose(param, expected, atol=1e-6)


def test_streamed_table_run_equals_resident_bitwise(tmp_path: Path) -> None:
    model = make_tiny_tune_model(tmp_path / "model", layers=2, tied=True)
    settings: dict[str, object] = dict(
        model=str(model), method="zo-sgd", task="polarity-k16", steps=3, lr=1e-2, batch_size=4, save_model=False
    )
    resident = tune(TuneConfig(**settings, zo_noise="table", out=tmp_path / "r"))  # type: ignore[arg-type]
    stream = tune(TuneConfig(**settings, zo_noise="table", weights="stream", out=tmp_path / "s"))  # type: ignore[arg-type]
    gaussian = tune(TuneConfig(**settings, out=tmp_path / "g"))  # type: ignore[arg-type]
    assert stream.losses == resident.losses and stream.loss_after == resident.loss_after
    assert resident.losses[1:] != gaussian.losses[1:]  # the table's directions are other directions
    assert resident.zo_noise == "table" and gaussian.zo_noise == "gaussian"


def test_bad_noise_kinds_get_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--zo-noise", "uniform", "--steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown --zo-noise 'uniform'" in err and len(err.splitlines()) == 1
    assert main(["tune", "--method", "lora", "--zo-noise", "table", "--steps", "1"]) != 0
    assert "--zo-noise applies to zeroth-order methods" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown noise source"):
        make_noise("uniform")
    with pytest.raises(ValueError, match="at least one chunk"):
        NoiseTable(CHUNK - 1)
