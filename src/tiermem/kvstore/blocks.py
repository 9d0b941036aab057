"""KV blocks evicted from attention's hot set: a warm tier in RAM over a cold tier in RAM or on disk.

A block is the keys and values of a run of tokens of one layer: (Hkv, n, D) each, keys before RoPE. The block-memory
policies (InfLLM, EM-LLM, SentenceKV) put every block here once and get the ones they retrieve back.

- ``backend="ram"``: every block stays in RAM (the warm tier has no limit).
- ``backend="disk"``: every block is written once to a per-layer file in a temporary folder (removed on close) and
  the warm tier is an LRU of blocks in RAM bounded by ``warm_bytes``. Files are read with ``pread`` into fresh
  tensors rather than memory-mapped: mapped pages count towards the process's RSS until unmapped, so a mapping
  would hide the memory the limit is meant to bound, and a block read costs one copy either way.

Every block carries a CRC32: a truncated or corrupt file raises :class:`KVStoreError`, never a wrong answer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tiermem.errors import TiermemError
from tiermem.kvstore import ALLOCATORS
from tiermem.kvstore.meter import MemoryMeter
from tiermem.kvstore.quant import KV_DTYPES

BACKENDS = ("ram", "disk")
STORE_CHOICES = ("auto", *BACKENDS)  # "auto": RAM without a KV memory limit, disk with one


class KVStoreError(TiermemError):
    """A KV block on disk cannot be read back as it was written."""


@dataclass(frozen=True)
class StoreConfig:
    """Where KV lives: the block store's ``backend`` and ``folder``, and the hot buffers' ``allocator``.

    ``warm_bytes`` bounds the RAM tier of the disk backend (None: no bound); a :class:`MemoryMeter` with a limit
    bounds it further to what the other holders leave free. ``backend="auto"`` is a request: :meth:`resolve` turns it
    into ``"disk"`` under a KV memory limit and ``"ram"`` without one.
    """

    backend: str = "auto"
    folder: str | None = None  # parent of the temporary folder for the disk backend (default: the system temp dir)
    warm_bytes: int | None = None
    allocator: str = "grow"  # how hot KV buffers get memory: "grow", "paged" or "concat" (see tiermem.kvstore)
    kv_dtype: str = "auto"  # how hot KV buffers store rows: auto (the model's dtype), a float dtype or int8

    def __post_init__(self) -> None:
        if self.backend not in STORE_CHOICES:
            raise TiermemError(f"unknown KV store '{self.backend}': use one of {', '.join(STORE_CHOICES)}")
        if self.allocator not in ALLOCATORS:
            raise TiermemError(f"unknown KV allocator '{self.allocator}': use one of {', '.join(ALLOCATORS)}")
        if self.kv_dtype not in KV_DTYPES:
            raise TiermemError(f"unknown KV dtype '{self.kv_dtype}': use one of {', '.join(KV_DTYPES)}")
        if self.folder is not None and not Path(self.folder).is_dir():
            raise TiermemError(f"KV store folder '{self.folder}' does not exist")

    def resolve(self, kv_memory: int | None) -> StoreConfig:
        """This configuration with ``"auto"`` replaced by the backend a run with this KV memory limit uses."""
        if self.backend != "auto":
            return self
        return replace(self, backend="disk" if kv_memory is not None else "ram")


@dataclass(frozen=True)
class _Entry:
    offset: int
    shape: tuple[int, int, int]
    nbytes: int
    crc: int


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


class BlockStore:
    """Blocks of all layers, addressed by (layer, block id). See the module docstring for the tiers."""

    WARM = "block store (warm tier)"

    def __init__(self, config: StoreConfig, dtype: torch.dtype, meter: MemoryMeter | None = None):
        self.meter = meter or MemoryMeter()
        self.config = config.resolve(self.meter.limit)
        self.dtype = dtype
        self._ram: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._warm: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._warm_bytes = 0
        self._ram_bytes = 0
        self._index: dict[tuple[int, int], _Entry] = {}
        self._files: dict[int, int] = {}  # layer -> file descriptor
        self._sizes: dict[int, int] = {}  # layer -> bytes written
        self._counts: dict[int, int] = {}  # layer -> blocks
        self.folder: Path | None = None
        self.reads = 0  # blocks read from disk
        self.peak_warm_bytes = 0
        if self.config.backend == "disk":
            self.meter.reclaim = lambda: self._shrink(self._warm_limit())
            self.folder = Path(tempfile.mkdtemp(prefix="tiermem-kv-", dir=self.config.folder))
            self._finalizer = weakref.finalize(self, _remove, self.folder, self._files)

    # -- writing -----------------------------------------------------------------------------------------------
    def put(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store one block (keys and values (Hkv, n, D)); returns its id within the layer (0, 1, 2, ...)."""
        block = self._counts.get(layer, 0)
        self._counts[layer] = block + 1
        keys, values = keys.contiguous(), values.contiguous()
        if self.config.backend == "ram":
            self._ram[(layer, block)] = (keys, values)
            self._ram_bytes += 2 * keys.numel() * keys.element_size()
            self.meter.set(self.WARM, self._ram_bytes)
            return block
        data_k, data_v = _as_bytes(keys), _as_bytes(values)
        fd = self._fd(layer)
        offset = self._sizes.get(layer, 0)
        os.pwrite(fd, data_k, offset)
        os.pwrite(fd, data_v, offset + len(data_k))
        nbytes = len(data_k) + len(data_v)
        crc = zlib.crc32(data_v, zlib.crc32(data_k))
        self._index[(layer, block)] = _Entry(offset, tuple(keys.shape), nbytes, crc)  # type: ignore[arg-type]
        self._sizes[layer] = offset + nbytes
        self._remember(layer, block, keys, values)
        return block

    def _fd(self, layer: int) -> int:
        if layer not in self._files:
            assert self.folder is not None
            self._files[layer] = os.open(self.folder / f"layer{layer:03d}.kv", os.O_RDWR | os.O_CREAT, 0o600)
        return self._files[layer]

    def _warm_limit(self) -> int | None:
        bounds = [b for b in (self.config.warm_bytes, self.meter.room(self.WARM)) if b is not None]
        return min(bounds) if bounds else None

    def _remember(self, layer: int, block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put a block in the warm LRU, dropping the least recently used blocks beyond the bound."""
        limit = self._warm_limit()
        size = 2 * keys.numel() * keys.element_size()
        if limit is not None and size > limit:
            self._shrink(limit)
            return
        self._warm[(layer, block)] = (keys, values)
        self._warm_bytes += size
        self._shrink(limit)

    def _shrink(self, limit: int | None) -> None:
        """Drop least recently used warm blocks (they are on disk) until the warm tier fits ``limit``."""
        while limit is not None and self._warm_bytes > limit and self._warm:
            _, (k, _) = self._warm.popitem(last=False)
            self._warm_bytes -= 2 * k.numel() * k.element_size()
        self.peak_warm_bytes = max(self.peak_warm_bytes, self._warm_bytes)
        self.meter.set(self.WARM, self._warm_bytes)

    # -- reading -----------------------------------------------------------------------------------------------
    def get(self, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (Hkv, n, D) of one block."""
        key = (layer, block)
        if self.config.backend == "ram":
            return self._ram[key]
        if key in self._warm:
            self._warm.move_to_end(key)
            return self._warm[key]
        keys, values = self._read(layer, block)
        self._remember(layer, block, keys, values)
        return keys, values

    def _read(self, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._index[(layer, block)]
        data = os.pread(self._files[layer], entry.nbytes, entry.offset)
        where = f"KV block {block} of layer {layer} in {self.folder}"
        if len(data) != entry.nbytes:
            raise KVStoreError(f"{where} is truncated ({len(data)} of {entry.nbytes} bytes on disk)")
        if zlib.crc32(data) != entry.crc:
            raise KVStoreError(f"{where} is corrupt (checksum mismatch)")
        self.reads += 1
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.dtype)
        half = flat.numel() // 2
        return flat[:half].view(entry.shape), flat[half:].view(entry.shape)

    # -- accounting --------------------------------------------------------------------------------------------
    @property
    def ram_bytes(self) -> int:
        """Bytes of blocks held in RAM now."""
        return self._ram_bytes if self.config.backend == "ram" else self._warm_bytes

    @property
    def disk_bytes(self) -> int:
        return sum(self._sizes.values())

    def close(self) -> None:
        """Drop every block and remove the disk folder."""
        self._ram.clear()
        self._warm.clear()
        self._warm_bytes = self._ram_bytes = 0
        self.meter.set(self.WARM, 0)
        if self.folder is not None:
            self._finalizer()


def _remove(folder: Path, files: dict[int, int]) -> None:
    for fd in files.values():
        os.close(fd)
    files.clear()
    shutil.rmtree(folder, ignore_errors=True)
