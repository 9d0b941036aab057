"""Superpipeline's sliding window over decoder layers: k layers held, loaded ahead, evicted k' at a time.

A background thread loads layers (see :mod:`tiermem.weights.loaders`: populate a memory map, or read into a slot;
both release the GIL, so a load overlaps with the layer the main thread computes). The main thread calls
:meth:`LayerPrefetcher.acquire` before a layer runs (it blocks only if the load has not finished) and
:meth:`~LayerPrefetcher.release` after; a released layer becomes evictable, and when the loader needs one of the
``k`` slots it evicts the ``k'`` least recently released layers at once (Superpipeline's two parameters).
Look-ahead wraps from the last layer to the first, because the next forward (the next prefill chunk or decoding
step) starts there. With ``k`` equal to the number of layers nothing is ever evicted and each layer loads once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

import torch

from tiermem.weights.loaders import make_loader
from tiermem.weights.shards import LayerStore


class LayerPrefetcher:
    """Loads decoder layers of ``store`` into ``k`` slots ahead of use; see the module docstring."""

    def __init__(
        self, store: LayerStore, k: int, evict_batch: int = 1, drop_page_cache: bool = False, loader: str = "mmap"
    ):
        num_layers = len(store.layers)
        if not 1 <= k <= num_layers:
            raise ValueError(f"k must be in [1, {num_layers}], got {k}")
        if not 1 <= evict_batch <= k:
            raise ValueError(f"evict_batch must be in [1, {k}], got {evict_batch}")
        self.store, self.k, self.evict_batch = store, k, evict_batch
        self.loader = make_loader(loader, store, k, drop_page_cache)
        self._free = list(range(k))
        self._slot_of: dict[int, int] = {}  # layer -> slot, for layers loaded or being loaded
        self._ready: dict[int, threading.Event] = {}
        self._errors: dict[int, BaseException] = {}
        self._released: OrderedDict[int, None] = OrderedDict()  # evictable, least recently released first
        self._queue: deque[int] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # Accounting: what the loads cost and how long compute waited for them.
        self.loads = 0
        self.evictions = 0
        self.bytes_read = 0
        self.wait_seconds = 0.0
        self.read_seconds = 0.0
        self.max_held = 0  # most layers in slots at once (loaded or loading); never above k
        self._thread = threading.Thread(target=self._work, name="tiermem-layer-loader", daemon=True)
        self._thread.start()

    def reset_counters(self) -> None:
        """Start the load, byte and wait counters from zero (at the start of a generation)."""
        self.loads, self.evictions, self.bytes_read = 0, 0, 0
        self.wait_seconds, self.read_seconds = 0.0, 0.0

    @property
    def num_layers(self) -> int:
        return len(self.store.layers)

    def held(self) -> list[int]:
        """Layers in slots now (loaded or loading)."""
        with self._cond:
            return sorted(self._slot_of)

    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        """Block until ``layer`` is loaded; return its tensors as views into its slot and schedule the next ones."""
        with self._cond:
            self._released.pop(layer, None)  # held from an earlier pass: no longer evictable
            if layer not in self._slot_of:  # not loaded yet: it is needed now, ahead of any look-ahead
                if layer in self._queue:
                    self._queue.remove(layer)
                self._queue.appendleft(layer)
            self._schedule_ahead(layer)
            self._cond.notify_all()
            event = self._ready.setdefault(layer, threading.Event())
        start = time.perf_counter()
        event.wait()
        self.wait_seconds += time.perf_counter() - start
        with self._cond:
            if layer in self._errors:
                raise self._errors.pop(layer)
            slot = self._slot_of[layer]
        return self.loader.tensors(layer, slot)

    def release(self, layer: int) -> None:
        """``layer`` finished computing: its slot may be reused (its views must no longer be used)."""
        with self._cond:
            self._released[layer] = None
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.loader.close()

    def _schedule_ahead(self, layer: int) -> None:
        """Queue the ``k - 1`` layers after ``layer`` (wrapping around) that are neither held nor queued."""
        for step in range(1, self.k):
            nxt = (layer + step) % self.num_layers
            if nxt == layer:
                break
            if nxt not in self._slot_of and nxt not in self._queue:
                self._queue.append(nxt)

    def _evict(self) -> list[tuple[int, int]]:
        """Take up to ``evict_batch`` least recently released layers out of their slots (caller holds the lock);
        the loader thread releases their memory after dropping the lock (``MADV_DONTNEED`` takes milliseconds)."""
        evicted = []
        for _ in range(min(self.evict_batch, len(self._released))):
            layer, _ = self._released.popitem(last=False)
            slot = self._slot_of.pop(layer)
            self._free.append(slot)
            self._ready.pop(layer, None)
            self.evictions += 1
            evicted.append((layer, slot))
        return evicted

    def _next_load(self) -> tuple[int, int, list[tuple[int, int]]] | None:
        """Wait for a queued layer and a slot for it; also the layers evicted to free it. None when closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._queue:
                    evicted = self._evict() if not self._free and self._released else []
                    if self._free:
                        layer = self._queue.popleft()
                        slot = self._free.pop()
                        self._slot_of[layer] = slot
                        self._ready.setdefault(layer, threading.Event())
                        self.max_held = max(self.max_held, len(self._slot_of))
                        return layer, slot, evicted
                self._cond.wait()

    def _work(self) -> None:
        while (job := self._next_load()) is not None:
            layer, slot, evicted = job
            start = time.perf_counter()
            for old_layer, old_slot in evicted:  # only this thread loads, so no slot is reused before this
                self.loader.evict(old_layer, old_slot)
            try:
                self.bytes_read += self.loader.load(layer, slot)
            except BaseException as exc:  # handed to the thread that waits for this layer
                with self._cond:
                    self._errors[layer] = exc
                    self._free.append(self._slot_of.pop(layer))
            self.read_seconds += time.perf_counter() - start
            self.loads += 1
            with self._cond:
                # A failed load leaves no layer behind: its set event goes too, so a retry waits for a new load.
                event = self._ready.pop(layer) if layer in self._errors else self._ready[layer]
                event.set()
                self._cond.notify_all()
