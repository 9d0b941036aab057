"""ZO2 on disk (``tiermem tune --weights stream``): the same losses as resident MeZO, bitwise; resume after a crash;
the tuned model loads back; limits and corrupt layers are one-line errors (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tune_fixtures import make_tiny_tune_model
from tiermem.cli import main
from tiermem.errors import TiermemError
from tiermem.tune import TuneConfig, tune
from tiermem.tune.generations import layer_path, other
from tiermem.tune.layer_files import read_aligned, write_layer
from tiermem.tune.stream import StreamRunner
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


def test_streamed_untied_equals_resident_bitwise(tmp_path: Path) -> None:
    """Untied embedding and head: the embedding's −ε rows come from the batch's rows, the head goes −ε in place."""
    untied = make_tiny_tune_model(tmp_path / "model", layers=2, tied=False)
    resident = _run(untied, tmp_path / "resident", "resident", steps=3, save_model=False)
    stream = _run(untied, tmp_path / "stream", "stream", steps=3, save_model=False)
    assert stream.losses == resident.losses and stream.loss_after == resident.loss_after


def test_streamed_linear_schedule_equals_resident(tied_model: Path, tmp_path: Path) -> None:
    """A step's delayed update (applied when the next step reads the layer) uses that step's lr, not the next one's."""
    resident = _run(tied_model, tmp_path / "resident", "resident", lr_schedule="linear", save_model=False)
    stream = _run(tied_model, tmp_path / "stream", "stream", lr_schedule="linear", save_model=False)
    constant = _run(tied_model, tmp_path / "constant", "stream", save_model=False)
    assert stream.losses == resident.losses and stream.loss_after == resident.loss_after
    assert stream.losses[2:] != constant.losses[2:]  # the schedule did change the updates


def test_streamed_without_overlap_is_the_same_run(tied_model: Path, tmp_path: Path) -> None:
    """A --weight-memory that leaves room for one layer only: no read-ahead or write-behind, same losses.

    The resident group counts once (no −ε copy of it): resident + 1.5 layers holds one layer, resident + 3 three.
    """
    reference = _run(tied_model, tmp_path / "ref", "stream", steps=3)
    store = open_store(tmp_path / "ref" / "weights-0")
    limit = store.resident_bytes + store.max_layer_bytes + store.max_layer_bytes // 2
    tight = _run(tied_model, tmp_path / "tight", "stream", steps=3, weight_memory=limit)
    assert tight.losses == reference.losses
    config = TuneConfig(model=str(tied_model), weights="stream", weight_memory=limit)
    runner = StreamRunner(config, None, _meta_model(tied_model), store, tmp_path)  # type: ignore[arg-type]
    assert runner.held == 1
    config.weight_memory = store.resident_bytes + 3 * store.max_layer_bytes
    assert StreamRunner(config, None, _meta_model(tied_model), store, tmp_path).held == 3  # type: ignore[arg-type]
    with pytest.raises(TiermemError, match="below what one streamed ZO step holds"):
        _run(tied_model, tmp_path / "none", "stream", steps=3, weight_memory=store.resident_bytes)


def _meta_model(folder: Path) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.tie_weights()
    return model


def test_streamed_resume_after_a_crash(tied_model: Path, tmp_path: Path) -> None:
    """A crash in step 4's writes: the other generation holds a torn ``.tmp``, a layer of the unfinished step and a
    torn manifest; the resumed run repeats step 4 from the checkpoint's generation, as the uninterrupted run did,
    and leaves no ``.tmp`` behind."""
    whole = _run(tied_model, tmp_path / "whole", "stream", steps=5, save_model=False)
    settings = dict(model=str(tied_model), method="zo-sgd", task="polarity-k16", steps=5, lr=1e-2, batch_size=4)
    first = tune(TuneConfig(**settings, weights="stream", out=tmp_path / "run"), stop_after=3)  # type: ignore[arg-type]
    assert first.steps == 3
    current = tmp_path / "run" / json.loads((tmp_path / "run" / "checkpoint.json").read_text())["stream"]["folder"]
    torn = layer_path(other(current), 1)
    torn.with_name(torn.name + ".tmp").write_bytes(torn.read_bytes()[:1000])  # killed while writing layer 1
    tensors = {k: 2 * v for k, v in read_aligned(layer_path(current, 0)).items()}
    write_layer(layer_path(other(current), 0), tensors)  # step 4's layer 0, renamed into place, never checkpointed
    (other(current) / "manifest.json").write_text('{"num_lay')  # and a torn manifest there (a kill mid-copy)
    resumed = tune(TuneConfig(**settings, weights="stream", out=tmp_path / "run", resume=True))  # type: ignore[arg-type]
    assert resumed.resumed_from == 3
    assert resumed.losses == whole.losses and resumed.after == whole.after
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_generation_files() -> None:
    assert other(Path("/r/weights-0")) == Path("/r/weights-1") and other(Path("/r/weights-1")) == Path("/r/weights-0")
    assert layer_path(Path("g"), 7).name == "layer_0007.safetensors"
    assert layer_path(Path("g"), -1).name == "resident.safetensors"


def test_streamed_corrupt_layer_is_refused(tied_model: Path, tmp_path: Path) -> None:
    _run(tied_model, tmp_path, "stream", steps=2, save_model=False)
    folder = tmp_path / json.loads((tmp_path / "checkpoint.json").read_text())["stream"]["folder"]
    layer = folder / "layer_0001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-3] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(TiermemError, match="does not match its SHA-256"):
        _run(tied_model, tmp_path, "stream", steps=3, resume=True)
    layer.unlink()  # a missing layer file: the same one-line error, not a FileNotFoundError
    with pytest.raises(TiermemError, match=r"layer_0001\.safetensors is missing"):
        _run(tied_model, tmp_path, "stream", steps=3, resume=True)


def test_stream_rejects_stateful_rules_and_lora(tied_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for method in ("zo-adam", "zo-lora", "adamw"):
        code = main(["tune", "--model", str(tied_model), "--method", method, "--weights", "stream"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--weights stream trains" in err


def test_write_layer_is_safetensors_with_its_checksum(tmp_path: Path) -> None:
    """The layer writer's own safetensors: loadable by safetensors, the SHA-256 is the file's, read back aligned."""
    from tiermem.tune.checkpoint import sha256_file

    tensors = {
        "a.weight": torch.randn(3, 5),
        "b.weight": torch.randn(7).to(torch.bfloat16),
        "c.bias": torch.randn(2, 2, 2).to(torch.float16),
    }
    path = tmp_path / "layer_0000.safetensors"
    checksum = write_layer(path, tensors)
    assert checksum == sha256_file(path) and not path.with_name(path.name + ".tmp").exists()
    for loaded in (load_file(str(path)), read_aligned(path)):
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
