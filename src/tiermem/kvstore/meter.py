"""Who holds how many KV bytes in RAM right now, the peak of the total, and the room left under a limit."""

from __future__ import annotations

from collections.abc import Callable, Hashable


class MemoryMeter:
    """Each holder (a layer, the block store's warm tier) reports its current bytes; the meter keeps the total.

    ``peak`` is the largest total seen at any report, so it is the peak of the sum, not a sum of peaks. When a
    report pushes the total past the limit, ``reclaim`` (the block store's warm tier, which can always drop blocks
    that also sit on disk) is asked to give room back before the peak is taken.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self._held: dict[Hashable, int] = {}
        self.total = 0
        self.peak = 0
        self.reclaim: Callable[[], None] | None = None
        self._reclaiming = False  # reclaim reports its own new size; that report must not reclaim again

    def set(self, holder: Hashable, nbytes: int) -> None:
        self.total += nbytes - self._held.get(holder, 0)
        self._held[holder] = nbytes
        over = self.limit is not None and self.total > self.limit
        if over and self.reclaim is not None and not self._reclaiming:
            self._reclaiming = True
            try:
                self.reclaim()
            finally:
                self._reclaiming = False
        self.peak = max(self.peak, self.total)

    def held(self, holder: Hashable) -> int:
        return self._held.get(holder, 0)

    def room(self, holder: Hashable) -> int | None:
        """Bytes ``holder`` may hold without the total passing the limit (None: no limit)."""
        if self.limit is None:
            return None
        return max(self.limit - (self.total - self.held(holder)), 0)
