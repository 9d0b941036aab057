"""``--weights stream``: a model whose decoder layers live on disk and pass through a few RAM slots.

The model is built on the ``meta`` device (accelerate's ``init_empty_weights``); the resident group (embeddings,
final norm, head) is read into RAM once; each decoder layer gets a forward pre-hook that takes its tensors from the
:class:`LayerPrefetcher` (zero-copy views into a slot) and a forward hook that puts the ``meta`` placeholders back
and releases the slot. The computation is the resident model's, on the same bytes, so the outputs are identical.

Memory accounting: the limit covers the resident group plus ``k`` layers. With the default ``mmap`` loader the
layers held are populated file pages of a read-only map, counted in the process's RSS (``RssFile``) until eviction
drops them (``MADV_DONTNEED``); with ``read`` they are ``k`` private slots allocated once. Either way the weights in
the process never exceed the limit. The kernel's page cache may keep the files after eviction (it is not the
process's memory and is reclaimed under pressure); ``drop_page_cache=True`` evicts them from it too, so every load
is a disk read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from tiermem.errors import TiermemError
from tiermem.weights.loaders import LOADERS
from tiermem.weights.prefetch import LayerPrefetcher
from tiermem.weights.shards import LayerStore, convert, open_store, read_group, source_fingerprint

MIB = 2**20


@dataclass
class StreamConfig:
    """Superpipeline's parameters. ``weight_memory`` bounds resident tensors plus ``k`` layer slots (bytes; None:
    every layer stays once loaded); ``prefetch_layers`` is k (default: as many as the limit allows); ``evict_layers``
    is k', the layers evicted at once when a slot is needed."""

    weight_memory: int | None = None
    prefetch_layers: int | None = None
    evict_layers: int = 1
    drop_page_cache: bool = False
    loader: str = "mmap"  # "mmap": populate a memory map ahead of use; "read": copy into k preallocated slots


def choose_k(store: LayerStore, config: StreamConfig) -> int:
    """The number of layer slots: what the limit allows, or ``prefetch_layers`` if it fits; a clear error if not."""
    num_layers, layer = len(store.layers), store.max_layer_bytes
    if config.weight_memory is None:
        fits = num_layers
    else:
        room = config.weight_memory - store.resident_bytes
        if room < layer:
            need = (store.resident_bytes + layer) / MIB
            raise TiermemError(
                f"--weight-memory {config.weight_memory / MIB:.0f} MiB is below the resident tensors "
                f"({store.resident_bytes / MIB:.0f} MiB: embeddings, final norm, head) plus one layer "
                f"({layer / MIB:.0f} MiB): give at least {need:.0f} MiB"
            )
        fits = min(num_layers, room // layer)
    k = config.prefetch_layers or fits
    if not 1 <= k <= fits:
        raise TiermemError(f"--prefetch-layers {k} does not fit: at most {fits} layers of {layer / MIB:.0f} MiB fit")
    if config.loader not in LOADERS:
        raise TiermemError(f"unknown weight loader '{config.loader}': use one of {', '.join(LOADERS)}")
    if not 1 <= config.evict_layers <= k:
        raise TiermemError(f"--evict-layers must be between 1 and the layers held ({k}), got {config.evict_layers}")
    return k


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that share another parameter's tensor (a tied ``lm_head``) -> the name that owns it."""
    owner: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = owner.setdefault(id(param), name)
        if first != name:
            aliases[name] = first
    return aliases


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = param


def layer_store_for(source: Path, model: nn.Module, dtype: torch.dtype, cache: Path) -> LayerStore:
    """The per-layer store of ``source`` under ``cache`` (converted on first use), validated against ``model``."""
    aliases = _tied_aliases(model)
    expected = {name for name, _ in model.named_parameters()}
    target = cache / f"{source.name}-{source_fingerprint(source, dtype)}"
    if not target.is_dir():
        convert(source, target, dtype, tied=set(aliases))
    return open_store(target, expected)


class StreamedWeights:
    """Installs layer streaming on a meta-device ``model``; :meth:`close` stops the loader."""

    def __init__(self, model: PreTrainedModel, store: LayerStore, config: StreamConfig):
        self.model, self.store, self.config = model, store, config
        self.k = choose_k(store, config)
        self._load_resident()
        self.layers = decoder_layers(model)
        if len(self.layers) != len(store.layers):
            raise TiermemError(f"the model has {len(self.layers)} layers, the store {len(store.layers)}")
        # The meta placeholders each layer gets back after its forward (its slot may then be reused).
        self._placeholders = [dict(layer.named_parameters()) for layer in self.layers]
        self.prefetcher = LayerPrefetcher(store, self.k, config.evict_layers, config.drop_page_cache, config.loader)
        self._handles = []
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(layer.register_forward_hook(self._post_hook(index)))

    def _load_resident(self) -> None:
        aliases = _tied_aliases(self.model)
        tensors = read_group(self.store.resident)
        params = {name: nn.Parameter(t, requires_grad=False) for name, t in tensors.items()}
        for name, param in params.items():
            _set_parameter(self.model, name, param)
        for alias, owner in aliases.items():
            if owner in params:
                _set_parameter(self.model, alias, params[owner])
        left = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith("model.layers.")]
        if left:
            raise TiermemError(f"layer store {self.store.folder} lacks resident tensors: {', '.join(left[:3])}")

    def _pre_hook(self, index: int) -> Any:
        layer = self.layers[index]
        prefix = f"model.layers.{index}."

        def pre_hook(module: nn.Module, args: Any) -> None:
            tensors = self.prefetcher.acquire(index)
            for name in self._placeholders[index]:
                _set_parameter(layer, name, nn.Parameter(tensors[prefix + name], requires_grad=False))

        return pre_hook

    def _post_hook(self, index: int) -> Any:
        layer = self.layers[index]

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            for name, placeholder in self._placeholders[index].items():
                _set_parameter(layer, name, placeholder)
            self.prefetcher.release(index)

        return post_hook

    @property
    def limit_bytes(self) -> int:
        """What the weights may hold in RAM: the resident group plus ``k`` slots."""
        return self.store.resident_bytes + self.k * self.store.max_layer_bytes

    def stats(self) -> dict[str, float | int | str]:
        p = self.prefetcher
        return {
            "weights": "stream",
            "weight_loader": self.config.loader,
            "weight_layers_held": self.k,
            "weight_bytes_limit": self.limit_bytes,
            "weight_loads": p.loads,
            "weight_bytes_read": p.bytes_read,
            "weight_wait_seconds": round(p.wait_seconds, 4),
            "weight_read_seconds": round(p.read_seconds, 4),
        }

    def reset_counters(self) -> None:
        self.prefetcher.reset_counters()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.prefetcher.close()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.layers`` of a decoder-only HF model, or a one-line error for other shapes."""
    try:
        layers = model.get_submodule("model.layers")
    except AttributeError:
        raise TiermemError("weight placement needs a decoder with model.layers (Llama, Qwen, Mistral, Gemma)") from None
    assert isinstance(layers, nn.ModuleList)
    return layers


def load_streamed(source: Path, dtype: torch.dtype, config: StreamConfig, cache: Path) -> StreamedWeights:
    """Build ``source``'s model on ``meta``, convert it to a layer store once, and install streaming."""
    hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()  # on meta, from_config leaves a tied head untied; the aliases below rely on the tie
    store = layer_store_for(source, model, dtype, cache)
    model.eval()
    return StreamedWeights(model, store, config)
