"""How a layer's bytes reach RAM: a memory map populated ahead of use, or a copy into a preallocated slot.

Both hand out zero-copy tensor views and hold at most ``k`` layers, so the prefetcher's accounting is the same:

- :class:`MappedLoader` (default) maps every layer file once (address space only). Loading a layer asks the kernel
  to fill its page tables now (``MADV_POPULATE_READ``, from the loader thread, so the compute thread takes no page
  faults); evicting it drops them (``MADV_DONTNEED``), which is what takes the pages out of the process's RSS.
  No byte is copied: the GEMVs read the page cache's pages directly. On this machine (ext4, 4 KiB pages)
  populating and dropping a 176 MB layer costs ~14 + 6 ms of the loader thread, and streaming ran at 0.91x the
  resident model's speed (BENCHMARKS.md).
- :class:`CopyLoader` reads each layer with one sequential ``readinto`` into one of ``k`` slots allocated once
  (AirLLM and accelerate allocate per load instead). Its RSS is private memory that does not depend on how the
  kernel treats file pages, but each load moves the layer's bytes twice more through the memory bus (read from the
  page cache, write to the slot), which the GEMVs then share: measured 1.27x slower than ``mmap`` end to end.

:func:`read_tensor_into` is the resident model's loader (:mod:`tiermem.weights.resident`): plain reads into the
model's own tensors, converting through a small buffer, so loading never maps the checkpoint (a mapped float32
file's pages count in the process's RSS until it is unmapped: 513 MiB for SmolLM2-135M).

``drop_page_cache`` also evicts the file from the kernel's page cache after use (``POSIX_FADV_DONTNEED``), so the
next load is a real disk read; without it a model smaller than free RAM is read from disk once.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from io import RawIOBase
from typing import Protocol

import torch

from tiermem.errors import TiermemError
from tiermem.weights.shards import LayerStore, ShardFile, TensorEntry, read_into, views

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python 3.11 lacks the name
LOADERS = ("mmap", "read")
CONVERT_CHUNK_BYTES = 8 << 20  # a dtype-converting read goes through a buffer of at most this many stored bytes


def _read_exact(handle: RawIOBase, target: memoryview, what: str) -> None:
    done = 0
    while done < len(target):  # readinto may return short reads for large requests
        got = handle.readinto(target[done:])
        if not got:
            raise TiermemError(f"{what} was truncated while reading")
        done += got


def read_tensor_into(handle: RawIOBase, shard: ShardFile, entry: TensorEntry, out: torch.Tensor) -> None:
    """Read one stored tensor of ``shard`` (open as ``handle``, unbuffered) into ``out`` (contiguous, as many
    elements) with plain reads: no memory map, so no page of the file enters the process's RSS.

    A tensor stored in ``out``'s dtype is read straight into ``out``'s memory; otherwise through a buffer of the
    stored dtype, converted chunk by chunk with ``copy_`` (round to nearest even, as ``Tensor.to``), so a float32
    file loaded in bfloat16 never holds more than :data:`CONVERT_CHUNK_BYTES` of float32 at once.
    """
    flat = out.view(-1)
    size = entry.end - entry.start
    what = f"weights file {shard.path} ({entry.name})"
    if flat.numel() * torch.empty(0, dtype=entry.dtype).element_size() != size:
        raise TiermemError(f"{what}: {size} bytes stored for {flat.numel()} values of {entry.dtype}")
    handle.seek(shard.data_offset + entry.start)
    if entry.dtype == out.dtype:
        _read_exact(handle, memoryview(flat.view(torch.uint8).numpy()), what)  # type: ignore[arg-type]
        return
    itemsize = size // max(flat.numel(), 1)
    per_chunk = max(CONVERT_CHUNK_BYTES // max(itemsize, 1), 1)  # values
    buffer = torch.empty(min(per_chunk, flat.numel()) * itemsize, dtype=torch.uint8)
    for begin in range(0, flat.numel(), per_chunk):
        count = min(per_chunk, flat.numel() - begin)
        chunk = buffer[: count * itemsize]
        _read_exact(handle, memoryview(chunk.numpy()), what)  # type: ignore[arg-type]
        flat[begin : begin + count].copy_(chunk.view(entry.dtype))


class Loader(Protocol):
    def load(self, layer: int, slot: int) -> int:
        """Bring ``layer`` into RAM using ``slot``; return the bytes loaded."""
        ...

    def tensors(self, layer: int, slot: int) -> dict[str, torch.Tensor]: ...

    def evict(self, layer: int, slot: int) -> None: ...

    def close(self) -> None: ...


class CopyLoader:
    """``k`` slots of the largest layer's size, allocated once; a load is one ``readinto``."""

    def __init__(self, store: LayerStore, k: int, drop_page_cache: bool = False):
        self.store, self.drop_page_cache = store, drop_page_cache
        self.slots = [torch.empty(store.max_layer_bytes, dtype=torch.uint8) for _ in range(k)]

    def load(self, layer: int, slot: int) -> int:
        return read_into(self.store.layers[layer], self.slots[slot], self.drop_page_cache)

    def tensors(self, layer: int, slot: int) -> dict[str, torch.Tensor]:
        return views(self.store.layers[layer], self.slots[slot])

    def evict(self, layer: int, slot: int) -> None:
        pass  # the slot is simply overwritten by the next load

    def close(self) -> None:
        self.slots.clear()


class MappedLoader:
    """Every layer file mapped read-only once; load = populate the page tables, evict = drop them."""

    def __init__(self, store: LayerStore, k: int, drop_page_cache: bool = False):
        self.store, self.drop_page_cache = store, drop_page_cache
        self._maps: list[mmap.mmap] = []
        self._bases: list[torch.Tensor] = []
        for shard in store.layers:
            with shard.path.open("rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            with warnings.catch_warnings():  # the map is read-only; the weights are never written
                warnings.simplefilter("ignore", UserWarning)
                base = torch.frombuffer(mapped, dtype=torch.uint8, count=shard.data_bytes, offset=shard.data_offset)
            self._maps.append(mapped)
            self._bases.append(base)

    def load(self, layer: int, slot: int) -> int:
        try:
            self._maps[layer].madvise(MADV_POPULATE_READ)
        except OSError:  # kernels before 5.14: fault the pages in by touching one byte per page
            self._bases[layer][:: mmap.PAGESIZE].sum()
        return self.store.layers[layer].data_bytes

    def tensors(self, layer: int, slot: int) -> dict[str, torch.Tensor]:
        return views(self.store.layers[layer], self._bases[layer])

    def evict(self, layer: int, slot: int) -> None:
        self._maps[layer].madvise(mmap.MADV_DONTNEED)
        if self.drop_page_cache:
            with self.store.layers[layer].path.open("rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._bases.clear()
        for mapped in self._maps:
            with contextlib.suppress(BufferError):  # a caller still holds a view: the map goes when it does
                mapped.close()
        self._maps.clear()


def make_loader(kind: str, store: LayerStore, k: int, drop_page_cache: bool) -> Loader:
    if kind == "mmap":
        return MappedLoader(store, k, drop_page_cache)
    if kind == "read":
        return CopyLoader(store, k, drop_page_cache)
    raise ValueError(f"unknown loader '{kind}': use one of {', '.join(LOADERS)}")
