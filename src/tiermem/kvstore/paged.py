"""Demand-paged KV storage on the CPU: the vAttention idea (arXiv 2405.04437) with anonymous virtual memory.

vAttention reserves one contiguous virtual range per layer and maps physical pages only as the sequence grows, so
attention kernels see a plain contiguous tensor while memory follows the real length. On a CPU the same comes for
free from the kernel: an anonymous ``mmap`` with ``MAP_NORESERVE`` reserves address space without committing memory,
a page is committed the first time it is written, and ``madvise(MADV_DONTNEED)`` gives pages back. So the buffer
never copies its tokens to grow (a ``torch.cat`` cache copies all of them every step; a geometric buffer copies each
token a few times and holds up to 25% slack), and its resident size is the pages its tokens touch.
"""

from __future__ import annotations

import mmap

import torch

from tiermem.kvstore.dense import KVBuffer
from tiermem.kvstore.quant import KVFormat

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python exposes it from 3.12 on some builds
PAGE = mmap.PAGESIZE


def _align_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


class PagedKVBuffer(KVBuffer):
    """A :class:`KVBuffer` whose block is a virtual reservation committed page by page.

    Each array (keys and values per head, positions per head, scores per row) starts on a page boundary, so each
    row's pages commit as its tokens arrive and a compaction can return the pages past the new length. Growing past
    the reservation moves to a larger reservation (counted in ``reallocations``); plan the length to avoid it.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        min_growth: int = 64,
        score_rows: int = 0,
        reserve_tokens: int = 65536,
        kv_format: KVFormat | str | None = None,
    ):
        self._map: mmap.mmap | None = None
        self._rows: list[tuple[int, int, int]] = []  # (offset, bytes per token, row count) of each array
        self._reserve_tokens = reserve_tokens  # the smallest reservation: address space is cheap, copies are not
        super().__init__(num_heads, head_dim, dtype, min_growth, score_rows, kv_format)

    def _allocate(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        capacity = max(capacity, self._reserve_tokens)
        arrays = [  # (rows, values per token, dtype) of keys, values, positions, scores
            (self.num_heads, self.row_width, self.format.storage_dtype),
            (self.num_heads, self.row_width, self.format.storage_dtype),
            (self.num_heads, 1, torch.long),
            (self.scores.shape[0], 1, torch.float32),
        ]
        offset, layout = 0, []
        for rows, width, dtype in arrays:
            per_token = width * dtype.itemsize
            layout.append((offset, per_token, rows))
            offset += rows * _align_up(capacity * per_token)
        region = mmap.mmap(-1, offset, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        views = []
        for (start, per_token, rows), (_, width, dtype) in zip(layout, arrays, strict=True):
            row_elems = _align_up(capacity * per_token) // dtype.itemsize
            if rows:
                flat = torch.frombuffer(region, dtype=dtype, count=rows * row_elems, offset=start)
                views.append(flat.view(rows, row_elems)[:, : capacity * width].view(rows, capacity, width))
            else:
                views.append(torch.empty(0, capacity, width, dtype=dtype))
        self._map, self._rows = region, layout
        return views[0].unsqueeze(0), views[1].unsqueeze(0), views[2][..., 0], views[3][..., 0]

    def decode_keys(self) -> torch.Tensor:
        """The used rows only: the block is a reservation far larger than the tokens held."""
        return self.keys[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of committed pages: each row's tokens rounded up to whole pages."""
        if self._map is None:
            return 0
        return sum(rows * _align_up(self.length * per_token) for _, per_token, rows in self._rows)

    def keep(self, index: torch.Tensor, capacity: int | None = None) -> None:
        old = self.length
        super().keep(index, None if capacity is None or capacity <= self.capacity else capacity)
        self._release(self.length, old)

    def _release(self, new_length: int, old_length: int) -> None:
        """Return the pages that held tokens ``new_length .. old_length`` of every row."""
        if self._map is None or new_length >= old_length:
            return
        for start, per_token, rows in self._rows:
            row_bytes = _align_up(per_token * self.capacity)
            for row in range(rows):
                first = start + row * row_bytes + _align_up(new_length * per_token)
                last = start + row * row_bytes + _align_up(old_length * per_token)
                if last > first:
                    self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
