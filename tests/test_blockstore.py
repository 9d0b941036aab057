"""The block store: exact round trips through disk, bounded warm tier, loud failure on damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import BlockStore, KVStoreError, StoreConfig


def blocks(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(2, 5 + i, 8, generator=gen).to(dtype), torch.randn(2, 5 + i, 8, generator=gen).to(dtype))
        for i in range(n)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_round_trip_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    store = BlockStore(StoreConfig(backend="disk", folder=str(tmp_path), warm_bytes=0), dtype)
    data = blocks(4, dtype)
    ids = [store.put(layer, k, v) for layer in (0, 3) for k, v in data]
    assert ids == [0, 1, 2, 3, 0, 1, 2, 3]
    for layer in (0, 3):
        for block, (k, v) in enumerate(data):
            got_k, got_v = store.get(layer, block)
            assert torch.equal(got_k, k) and torch.equal(got_v, v) and got_k.dtype == dtype
    assert store.reads == 8  # nothing was kept warm
    folder = store.folder
    assert folder is not None and folder.is_dir()
    store.close()
    assert not folder.exists()


def test_warm_tier_is_an_lru_within_its_bound(tmp_path: Path) -> None:
    data = blocks(6)
    size = 2 * data[0][0].numel() * 4
    store = BlockStore(StoreConfig(backend="disk", folder=str(tmp_path), warm_bytes=3 * size), torch.float32)
    for k, v in data:
        store.put(0, k, v)
    assert store.ram_bytes <= 3 * size and store.peak_warm_bytes <= 3 * size
    store.get(0, 5)  # still warm
    assert store.reads == 0
    store.get(0, 0)  # evicted long ago: read back from disk
    assert store.reads == 1
    store.close()


def test_ram_store_keeps_everything() -> None:
    store = BlockStore(StoreConfig(), torch.float32)
    data = blocks(3)
    for k, v in data:
        store.put(1, k, v)
    assert torch.equal(store.get(1, 2)[0], data[2][0])
    assert store.ram_bytes == sum(2 * k.numel() * 4 for k, _ in data) and store.disk_bytes == 0


def test_corrupt_and_truncated_blocks_are_errors(tmp_path: Path) -> None:
    store = BlockStore(StoreConfig(backend="disk", folder=str(tmp_path), warm_bytes=0), torch.float32)
    for k, v in blocks(3):
        store.put(0, k, v)
    assert store.folder is not None
    path = next(store.folder.iterdir())
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(KVStoreError, match=r"block 0 of layer 0 .* corrupt"):
        store.get(0, 0)
    path.write_bytes(bytes(raw[: len(raw) - 16]))
    with pytest.raises(KVStoreError, match=r"block 2 of layer 0 .* truncated"):
        store.get(0, 2)
    assert issubclass(KVStoreError, TiermemError)  # the CLI reports it as one line
    store.close()


def test_bad_store_settings() -> None:
    with pytest.raises(TiermemError):
        StoreConfig(backend="tape")
    with pytest.raises(TiermemError):
        StoreConfig(backend="disk", folder="/no/such/folder")


def test_meter_over_the_limit_with_nothing_to_reclaim_records_the_peak() -> None:
    """Holders other than the warm tier can pass the limit (an estimate ran low): reclaiming then empties the warm
    tier once and the peak says the truth, instead of reclaiming forever."""
    from tiermem.kvstore.meter import MemoryMeter

    meter = MemoryMeter(limit=100)
    calls = []

    def reclaim() -> None:
        calls.append(1)
        meter.set("warm", 0)

    meter.reclaim = reclaim
    meter.set("warm", 40)
    meter.set("layer", 150)
    assert len(calls) == 1 and meter.held("warm") == 0
    assert meter.total == 150 and meter.peak == 150
