"""ZO2 on disk (``tiermem tune --weights stream``): the same losses as resident MeZO, bitwise; resume after a crash;
the tuned model loads back; limits and corrupt layers are one-line errors (tiny random models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tune_fixtures import make_tiny_tune_model
from tiermem.cli import main
from tiermem.errors import TiermemError
from tiermem.tune import TuneConfig, tune
from tiermem.tune.trainer import TuneResult
from tiermem.weights.shards import open_store


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Tied embedding and head: the resident group is used at both ends of the dual forward.
    return make_tiny_tune_model(tmp_path_factory.mktemp("tune-tied"), layers=3, tied=True)


def _run(model: Path, out: Path, weights: str, **kw: object) -> TuneResult:
    settings: dict[str, object] = dict(
        model=str(model), method="zo-sgd", task="polarity-k16", steps=4, lr=1e-2, batch_size=4, out=out
    )
    settings.update(weights=weights, **kw)
    return tune(TuneConfig(**settings))  # type: ignore[arg-type]


def test_streamed_zo_equals_resident_zo_bitwise(tied_model: Path, tmp_path: Path) -> None:
    resident = _run(tied_model, tmp_path / "resident", "resident")
    stream = _run(tied_model, tmp_path / "stream", "stream")
    assert stream.losses == resident.losses  # every step's ±ε losses, exactly
    assert stream.loss_after == resident.loss_after and stream.after == resident.after
    assert resident.losses[0] != resident.losses[-1]  # the weights did change
    # The saved models hold the same tensors (streamed: sharded per layer with an index).
    saved = load_file(str(tmp_path / "resident" / "model" / "model.safetensors"))
    shard = load_file(str(tmp_path / "stream" / "model" / "layer_0001.safetensors"))
    for name, tensor in shard.items():
        assert torch.equal(tensor, saved[name]), name
    from tiermem.models import load

    lm = load(str(tmp_path / "stream" / "model"))
    name = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(lm.model.state_dict()[name], saved[name])


def test_streamed_without_overlap_is_the_same_run(tied_model: Path, tmp_path: Path) -> None:
    """A --weight-memory that leaves room for one layer only: no read-ahead or write-behind, same losses."""
    reference = _run(tied_model, tmp_path / "ref", "stream", steps=3)
    store = open_store(tmp_path / "ref" / "weights-0")
    limit = 2 * store.resident_bytes + store.max_layer_bytes + store.max_layer_bytes // 2
    tight = _run(tied_model, tmp_path / "tight", "stream", steps=3, weight_memory=limit)
    assert tight.losses == reference.losses
    with pytest.raises(TiermemError, match="below what one streamed ZO step holds"):
        _run(tied_model, tmp_path / "none", "stream", steps=3, weight_memory=2 * store.resident_bytes)


def test_streamed_resume_after_a_crash(tied_model: Path, tmp_path: Path) -> None:
    whole = _run(tied_model, tmp_path / "whole", "stream", steps=5, save_model=False)
    settings = dict(model=str(tied_model), method="zo-sgd", task="polarity-k16", steps=5, lr=1e-2, batch_size=4)
    first = tune(TuneConfig(**settings, weights="stream", out=tmp_path / "run"), stop_after=3)  # type: ignore[arg-type]
    assert first.steps == 3
    resumed = tune(TuneConfig(**settings, weights="stream", out=tmp_path / "run", resume=True))  # type: ignore[arg-type]
    assert resumed.resumed_from == 3
    assert resumed.losses == whole.losses and resumed.after == whole.after


def test_streamed_corrupt_layer_is_refused(tied_model: Path, tmp_path: Path) -> None:
    _run(tied_model, tmp_path, "stream", steps=2, save_model=False)
    import json

    folder = tmp_path / json.loads((tmp_path / "checkpoint.json").read_text())["stream"]["folder"]
    layer = folder / "layer_0001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-3] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(TiermemError, match="does not match its SHA-256"):
        _run(tied_model, tmp_path, "stream", steps=3, resume=True)


def test_stream_rejects_stateful_rules_and_lora(tied_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for method in ("zo-adam", "zo-lora", "adamw"):
        code = main(["tune", "--model", str(tied_model), "--method", method, "--weights", "stream"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--weights stream trains" in err
