"""Per-layer weight shards: a model stored as one safetensors file per decoder layer plus one for the rest.

Layer streaming reads a whole layer with one sequential read into a preallocated slot, so each layer's tensors
must lie together in one file (AirLLM's layout; HF checkpoints shard by size, not by layer). :func:`convert` writes
that layout once from any HF folder (or a GGUF model already converted by :mod:`tiermem.models`), one group at a
time so conversion never holds the whole model; :func:`open_store` validates every file before any compute:
a missing file, a truncated shard or a missing tensor is a one-line :class:`TiermemError`.

The safetensors header (8-byte little-endian length + JSON) is parsed here rather than through ``safe_open``
because the streamer needs each file's data offset and each tensor's byte range to read a layer in one ``readinto``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiermem.errors import TiermemError
from tiermem.staging import staged_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
RESIDENT = "resident"  # the group of everything outside the decoder layers: embeddings, final norm, head
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}


def group_of(name: str) -> str:
    """``model.layers.7.mlp.up_proj.weight`` -> ``"7"``; anything outside the decoder layers -> ``"resident"``."""
    match = _LAYER_NAME.match(name)
    return match.group(1) if match else RESIDENT


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie inside its file's data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset from the start of the data section
    end: int


@dataclass(frozen=True)
class ShardFile:
    """One safetensors file: its data section starts at ``data_offset`` and spans ``data_bytes``."""

    path: Path
    data_offset: int
    data_bytes: int
    tensors: tuple[TensorEntry, ...]


def read_header(path: Path) -> ShardFile:
    """Parse a safetensors header and check the file holds every byte the header promises."""
    if not path.is_file():
        raise TiermemError(f"weight shard {path} is missing")
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(handle.read(length))
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = (int(x) for x in info["data_offsets"])
            entries.append(TensorEntry(name, _DTYPES[info["dtype"]], tuple(info["shape"]), start, end))
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise TiermemError(f"weight shard {path} is corrupt: {type(exc).__name__}: {exc}") from None
    data_bytes = max((e.end for e in entries), default=0)
    if 8 + length + data_bytes > size:
        raise TiermemError(
            f"weight shard {path} is truncated: {size} bytes on disk, the header promises {8 + length + data_bytes}"
        )
    entries.sort(key=lambda e: e.start)
    return ShardFile(path, 8 + length, data_bytes, tuple(entries))


@dataclass(frozen=True)
class LayerStore:
    """A validated per-layer store: ``resident`` (embeddings, norm, head) and ``layers[i]`` for each decoder layer."""

    folder: Path
    resident: ShardFile
    layers: tuple[ShardFile, ...]

    @property
    def max_layer_bytes(self) -> int:
        return max(layer.data_bytes for layer in self.layers)

    @property
    def resident_bytes(self) -> int:
        return self.resident.data_bytes

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + sum(layer.data_bytes for layer in self.layers)


def _file_name(group: str) -> str:
    return f"{RESIDENT}.safetensors" if group == RESIDENT else f"layer_{int(group):04d}.safetensors"


def open_store(folder: Path, expected: set[str] | None = None) -> LayerStore:
    """Open and validate a store written by :func:`convert`; ``expected`` names every tensor the model needs."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise TiermemError(f"{folder} is not a tiermem layer store (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        num_layers = int(manifest["num_layers"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TiermemError(f"layer store manifest {manifest_path} is corrupt: {exc}") from None
    resident = read_header(folder / _file_name(RESIDENT))
    layers = tuple(read_header(folder / _file_name(str(i))) for i in range(num_layers))
    if expected is not None:
        present = {e.name for shard in (resident, *layers) for e in shard.tensors}
        missing = sorted(expected - present)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise TiermemError(f"layer store {folder} lacks tensors the model needs: {', '.join(missing[:3])}{more}")
    return LayerStore(folder, resident, layers)


def _source_tensors(source: Path) -> dict[str, Path]:
    """Map each tensor name of an HF checkpoint folder to the safetensors file that holds it."""
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise TiermemError(f"model folder {source} has no .safetensors weights")
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    where[name] = file
        except Exception as exc:  # safetensors raises its own error type on damaged headers
            raise TiermemError(f"cannot read weights file {file}: {exc}") from None
    return where


def source_fingerprint(source: Path, dtype: torch.dtype) -> str:
    """Config text, weight file names and sizes, and the dtype: enough to notice a changed checkpoint."""
    digest = hashlib.sha256((source / "config.json").read_bytes())
    for file in sorted(source.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    digest.update(str(dtype).encode())
    return digest.hexdigest()[:16]


def convert(source: Path, target: Path, dtype: torch.dtype, tied: Collection[str] = ()) -> LayerStore:
    """Rewrite an HF checkpoint folder as one safetensors file per layer (atomically: :func:`staged_dir`).

    Tensors are cast to ``dtype``; names in ``tied`` (weights shared with another, e.g. a tied ``lm_head``) are
    skipped. One group is held in memory at a time.
    """
    where = _source_tensors(source)
    groups: dict[str, list[str]] = {}
    for name in where:
        if name not in tied:
            groups.setdefault(group_of(name), []).append(name)
    layer_ids = sorted(int(g) for g in groups if g != RESIDENT)
    if layer_ids != list(range(len(layer_ids))):
        raise TiermemError(f"model folder {source} has gaps in its layer numbering")
    with staged_dir(target) as partial:
        for group in [RESIDENT, *map(str, layer_ids)]:
            tensors = {}
            for name in groups.get(group, []):
                with safe_open(str(where[name]), framework="pt") as handle:
                    tensors[name] = handle.get_tensor(name).to(dtype).contiguous()
            save_file(tensors, str(partial / _file_name(group)))
            del tensors
        manifest = {"format": FORMAT_VERSION, "source": str(source), "num_layers": len(layer_ids), "dtype": str(dtype)}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return open_store(target)


def read_group(shard: ShardFile) -> dict[str, torch.Tensor]:
    """Load every tensor of one file into fresh memory (used for the resident group)."""
    buffer = torch.empty(shard.data_bytes, dtype=torch.uint8)
    read_into(shard, buffer)
    return views(shard, buffer)


def read_into(shard: ShardFile, buffer: torch.Tensor, drop_page_cache: bool = False) -> int:
    """Read a file's whole data section into ``buffer`` (uint8, at least ``data_bytes``) with one sequential read.

    ``drop_page_cache`` asks the kernel to forget the file's pages afterwards (``POSIX_FADV_DONTNEED``), so the next
    read comes from the disk and a "cold" tier is really cold. Returns the bytes read.
    """
    target = memoryview(buffer.numpy())[: shard.data_bytes]  # type: ignore[arg-type]
    with shard.path.open("rb", buffering=0) as handle:
        handle.seek(shard.data_offset)
        done = 0
        while done < shard.data_bytes:  # readinto may return short reads for large requests
            got = handle.readinto(target[done:])
            if not got:
                raise TiermemError(f"weight shard {shard.path} was truncated while reading")
            done += got
        if drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return done


def views(shard: ShardFile, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of ``shard`` as zero-copy views into ``buffer`` (uint8) holding its data section."""
    out = {}
    for entry in shard.tensors:
        raw = buffer[entry.start : entry.end]
        out[entry.name] = raw.view(entry.dtype).view(entry.shape)
    return out
