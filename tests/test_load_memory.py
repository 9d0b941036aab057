"""The resident loader's memory (issue 11): plain reads instead of a mapped checkpoint, each decoder layer quantized
as soon as it is read, freed heap returned; the model is the one ``from_pretrained`` (plus quantization) gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import tiermem.models as models
import tiermem.weights.resident as resident
from tiermem.formats import GGUF_TYPES_FILE, weight_modes
from tiermem.weights.quant import quantize_weights


def _reference(folder: Path, dtype: torch.dtype, quant: str) -> tuple[Any, str]:
    """What load() built before: transformers' from_pretrained, then the whole model quantized at once."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()
    per_module = weight_modes(models.source_types(folder)) if quant == "auto" else None
    label = quantize_weights(model, quant, 32, per_module).label if quant != "none" else str(dtype)
    return model, label


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.fixture
def folder(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    types = {"blk.0.ffn_gate.weight": "Q4_1", "blk.1.attn_q.weight": "Q4_1", "blk.1.ffn_up.weight": "Q8_0"}
    (copy / GGUF_TYPES_FILE).write_text(json.dumps(types))
    return copy


def _tie(folder: Path) -> None:
    """Make ``folder`` a tied-embedding checkpoint (as SmolLM2 and Gemma3 are): no lm_head tensor stored."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    ("dtype", "quant"),
    [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "auto"), ("bfloat16", "int4"), ("float32", "int8")],
)
def test_every_tensor_equals_from_pretrained(
    folder: Path, dtype: str, quant: str, tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tied:
        _tie(folder)
    monkeypatch.setattr(resident, "HEAD_ROWS", 128)  # the head (300 rows) in three blocks, the last one short
    lm = models.load(str(folder), dtype, weights_quant=quant)
    reference, label = _reference(folder, models.DTYPES[dtype], quant)
    ours, theirs = _tensors(lm.model), _tensors(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name
    assert lm.weights_format == (label if quant != "none" else dtype)
    if quant == "none":
        assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) == tied
        assert (reference.lm_head.weight is reference.model.embed_tokens.weight) == tied
    assert lm.model.config._attn_implementation == reference.config._attn_implementation
    assert lm.model.generation_config.eos_token_id == reference.generation_config.eos_token_id
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(lm.model(ids).logits, reference(ids).logits)


def test_no_float_weight_survives_quantization(folder: Path) -> None:
    lm = models.load(str(folder), "bfloat16", weights_quant="auto")
    assert not any(isinstance(m, nn.Linear) for m in lm.model.modules())
    floats = [n for n, p in lm.model.named_parameters() if p.dim() == 2 and p.is_floating_point()]
    assert floats == ["model.embed_tokens.weight"]  # the lookup table: the head reads its own int8 copy


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_checkpoint_is_read_not_mapped(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapped checkpoint's pages count in RSS while the map lives: no read may happen with the file mapped."""
    weights = folder / "model.safetensors"
    seen: list[bool] = []
    read = resident.read_tensor_into

    def spy(*args: Any) -> None:
        seen.append(_mapped(weights))
        read(*args)

    monkeypatch.setattr(resident, "read_tensor_into", spy)
    models.load(str(folder), "bfloat16", weights_quant="auto")
    assert seen and not any(seen)
    assert not _mapped(weights)


def test_layers_are_quantized_as_they_are_read(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a layer's weights are read, every earlier layer is already quantized (one layer of floats at a time)."""
    floats_at_read: dict[int, int] = {}
    read, build = resident.read_tensor_into, resident.AutoModelForCausalLM.from_config
    built: list[nn.Module] = []

    def from_config(*args: Any, **kwargs: Any) -> Any:
        built.append(build(*args, **kwargs))
        return built[-1]

    def spy(handle: Any, shard: Any, entry: Any, out: torch.Tensor) -> None:
        if entry.name.startswith("model.layers."):
            layer = int(entry.name.split(".")[2])
            earlier = [m for m in built[-1].model.layers[:layer].modules() if isinstance(m, nn.Linear)]
            floats_at_read[layer] = len(earlier)
        read(handle, shard, entry, out)

    monkeypatch.setattr(resident.AutoModelForCausalLM, "from_config", from_config)
    monkeypatch.setattr(resident, "read_tensor_into", spy)
    models.load(str(folder), "bfloat16", weights_quant="int8")
    assert floats_at_read == {0: 0, 1: 0}


def test_checkpoint_with_other_names_falls_back_to_transformers(folder: Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.extra.weight"] = torch.zeros(3)  # a tensor the model has no place for
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert resident.load_resident(folder, torch.bfloat16, "none", 32) is None
    lm = models.load(str(folder), "float32")  # transformers loads it (and drops the extra tensor)
    reference, _ = _reference(folder, torch.float32, "none")
    assert torch.equal(lm.model.model.layers[1].mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight)


def test_release_free_memory_returns_the_heap() -> None:
    assert models.release_free_memory()  # glibc here: malloc_trim ran


def test_a_checkpoint_used_as_stored_is_left_to_the_zero_copy_map(folder: Path) -> None:
    """float32 stored, float32 used, nothing quantized: from_pretrained's parameters view the mapped file (no
    copy at all), which plain reads could only match; a conversion or a quantization is read layer by layer."""
    assert resident.load_resident(folder, torch.float32, "none", 32) is None
    assert resident.load_resident(folder, torch.bfloat16, "none", 32) is not None
    assert resident.load_resident(folder, torch.float32, "int8", 32) is not None
