"""Layer files of a streamed ZO run: aligned reads, atomic checksummed writes, the resident group into a meta model.

Every decoder layer is one safetensors file (:mod:`tiermem.weights.shards`' layout). A streamed step reads each file
once (:func:`read_aligned`) and writes the updated layer once (:func:`write_layer`: temporary file, fsync, rename,
SHA-256 of what was written, hashed from the tensors' memory as it is written).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from tiermem.errors import TiermemError
from tiermem.weights.shards import LayerStore, read_header
from tiermem.weights.stream import _set_parameter, _tied_aliases

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_layer(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Save one layer atomically (temporary file, fsync, rename) as safetensors; return the file's SHA-256.

    Written here rather than by ``safetensors.torch.save_file``, which first copies every tensor into one ``bytes``
    (a second copy of the layer in RAM while it writes); each tensor's memory goes to the file as it is, and the
    SHA-256 is taken from the same buffers on the way (not by reading the file back). ``hashlib`` and the writes
    release the GIL, so this runs beside the compute thread. The layout is the format's own: an 8-byte
    little-endian header length, the JSON header padded with spaces to 8 bytes, then the data.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        end = offset + tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    blocks: list[bytes | memoryview] = [struct.pack("<Q", len(text)), text]
    for tensor in tensors.values():
        blocks.append(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    digest = hashlib.sha256()
    temp = path.with_name(path.name + ".tmp")
    with temp.open("wb", buffering=0) as handle:
        for block in blocks:
            digest.update(block)
            view = memoryview(block)
            while view:  # a raw write may be short
                view = view[handle.write(view) :]
        os.fsync(handle.fileno())
    temp.replace(path)
    return digest.hexdigest()


def read_aligned(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file in its own allocation (one ``readinto`` each).

    Zero-copy views into one buffer (:func:`read_group`) start at the header's arbitrary byte offsets; the GEMM
    kernels take other code paths on unaligned data and round differently, so the streamed run would drift from the
    resident one in the last bits. Separate allocations are aligned as the resident model's tensors are.
    """
    shard = read_header(path)
    tensors = {}
    with path.open("rb", buffering=0) as handle:
        for entry in shard.tensors:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            target = memoryview(tensor.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            handle.seek(shard.data_offset + entry.start)
            done = 0
            while done < entry.end - entry.start:
                got = handle.readinto(target[done:])
                if not got:
                    raise TiermemError(f"weight shard {path} was truncated while reading")
                done += got
            tensors[entry.name] = tensor
    return tensors


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def load_resident(model: nn.Module, store: LayerStore) -> None:
    aliases = _tied_aliases(model)
    tensors = read_aligned(store.resident.path)  # one allocation per tensor: no second copy of the group to clone
    params = {name: nn.Parameter(t, requires_grad=False) for name, t in tensors.items()}
    for name, param in params.items():
        _set_parameter(model, name, param)
    for alias, owner in aliases.items():
        if owner in params:
            _set_parameter(model, alias, params[owner])


def load_private(source: Path, dtype: torch.dtype, weight_memory: int | None) -> nn.Module:
    """``source``'s model with every weight in its own private, aligned allocation, read from the per-layer store.

    Full-parameter training writes every weight. ``from_pretrained`` leaves them as views of the safetensors
    file's map, so writing them in place turns each page into a private copy while an aligned clone (which the
    streamed run needs for bitwise-equal results) would keep the file's pages mapped too: twice the model in RSS.
    Reading each tensor once into its own buffer gives one copy, aligned exactly as the streamed runner's.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiermem.models import cache_root
    from tiermem.weights.stream import decoder_layers, layer_store_for

    hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()
    store = layer_store_for(source, model, dtype, cache_root() / "layers")
    if weight_memory is not None and store.total_bytes > weight_memory:
        raise TiermemError(
            f"the weights ({store.total_bytes / 2**20:.0f} MiB) exceed --weight-memory "
            f"{weight_memory / 2**20:.0f} MiB: use --weights stream"
        )
    load_resident(model, store)
    layers = decoder_layers(model)
    for shard in store.layers:
        for name, tensor in read_aligned(shard.path).items():
            _set_parameter(model, name, nn.Parameter(tensor, requires_grad=False))
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left or len(layers) != len(store.layers):
        raise TiermemError(f"layer store {store.folder} does not cover the model: {', '.join(left[:3])}")
    model.eval()
    return model
