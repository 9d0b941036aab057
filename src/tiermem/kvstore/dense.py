"""A growable block of keys, values and positions for one layer: the hot tier."""

from __future__ import annotations

import torch

from tiermem.kvstore.quant import KVFormat, kv_format


class KVBuffer:
    """Keys, values and original positions of the tokens one layer keeps, in one preallocated block.

    Shapes: ``keys`` and ``values`` (1, H, capacity, D); ``positions`` (H, capacity) int64. Attention reads the used
    prefix ``[:length]``. Appends grow the block geometrically (x1.25, at least ``min_growth`` tokens), so a token is
    copied a bounded number of times, unlike ``torch.cat`` per step which copies the whole cache every token.
    :meth:`reserve` sizes the block exactly when the final length is known. :meth:`keep` compacts the kept tokens to
    the front, and can resize the block (a compressed prompt should give its full-size block back).

    ``kv_format`` (:mod:`tiermem.kvstore.quant`) is how rows are stored: by default the compute ``dtype`` itself;
    otherwise ``keys``/``values`` hold stored rows (1, H, capacity, W) (``W = D + 4`` for int8: values, then their
    scale), :meth:`view` decodes to ``dtype`` and :meth:`stored` gives the rows as stored.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        min_growth: int = 64,
        score_rows: int = 0,
        kv_format: KVFormat | str | None = None,
    ):
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.format = _resolve(kv_format, dtype)
        self.row_width = self.format.row_width(head_dim)
        self.min_growth = min_growth
        self.length = 0
        self.keys = torch.empty(1, num_heads, 0, self.row_width, dtype=self.format.storage_dtype)
        self.values = torch.empty_like(self.keys)
        self.positions = torch.empty(num_heads, 0, dtype=torch.long)
        # Optional per-token statistics that follow the tokens (e.g. attention received), (score_rows, capacity).
        self.scores = torch.empty(score_rows, 0, dtype=torch.float32)
        self.peak_nbytes = 0
        self.reallocations = 0  # new blocks allocated (each copies the kept tokens)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (not just used) for keys, values and positions."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions, self.scores))

    def _allocate(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh keys, values, positions and scores tensors for ``capacity`` tokens."""
        keys = torch.empty(1, self.num_heads, capacity, self.row_width, dtype=self.format.storage_dtype)
        values = torch.empty_like(keys)
        positions = torch.empty(self.num_heads, capacity, dtype=torch.long)
        scores = torch.zeros(self.scores.shape[0], capacity, dtype=torch.float32)
        return keys, values, positions, scores

    def _reallocate(self, capacity: int) -> None:
        keys, values, positions, scores = self._allocate(capacity)
        self.reallocations += 1
        n = self.length
        keys[:, :, :n] = self.keys[:, :, :n]
        values[:, :, :n] = self.values[:, :, :n]
        positions[:, :n] = self.positions[:, :n]
        scores[:, :n] = self.scores[:, :n]
        self.keys, self.values, self.positions, self.scores = keys, values, positions, scores
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens in total without further reallocation."""
        if tokens > self.capacity:
            self._reallocate(tokens)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Add T tokens: ``keys``/``values`` (1, H, T, D), ``positions`` (T,) shared by all heads, or (H, T)."""
        t = keys.shape[2]
        needed = self.length + t
        if needed > self.capacity:
            self._reallocate(max(needed, int(self.capacity * 1.25), self.capacity + self.min_growth))
        end = self.length + t
        if self.format.quantized:  # one encode for both (a decode step's cost is per operation)
            rows = self.format.encode(torch.cat((keys, values)))
            self.keys[:, :, self.length : end], self.values[:, :, self.length : end] = rows[:1], rows[1:]
        else:
            self.keys[:, :, self.length : end] = self._encode(keys)
            self.values[:, :, self.length : end] = self._encode(values)
        self.positions[:, self.length : end] = positions
        if self.scores.shape[0]:
            self.scores[:, self.length : end] = 0.0
        self.length = end

    def _encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.format.plain else self.format.encode(rows)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept tokens: keys and values (1, H, length, D) in ``dtype``, positions (H, length).

        Zero-copy when rows are stored in ``dtype``; otherwise a decoded copy (attention reads :meth:`stored`
        instead, see :func:`tiermem.kvstore.quant_attention.stored_attention`)."""
        keys, values, positions = self.stored()
        if self.format.plain:
            return keys, values, positions
        return self.format.decode(keys, self.dtype), self.format.decode(values, self.dtype), positions

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept tokens as stored: keys and values (1, H, length, W) in the format's dtype, positions."""
        n = self.length
        return self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :n]

    def decode_keys(self) -> torch.Tensor:
        """Keys for a decode step's logits: the whole block (1, H, capacity, W) when it is at most ~1.25x the used
        part, else the used rows (1, H, length, W). The caller slices the logits to ``length``.

        A batched matmul over a prefix of the block is not dense per head, so the CPU kernels copy it first: in
        bfloat16 that measured 1.2-3.3x slower than reading the whole block, more with more keys (BENCHMARKS.md,
        "Decode attention at one query"). Rows past ``length`` are unused memory whose logits are cut off before the
        softmax."""
        if self.capacity <= self.length + self.length // 4 + self.min_growth:
            return self.keys
        return self.keys[:, :, : self.length]

    def write_keys(self, start: int, keys: torch.Tensor) -> None:
        """Overwrite the keys of slots ``start ...`` with ``keys`` (1, H, T, D) (re-rotated sink keys)."""
        self.keys[:, :, start : start + keys.shape[2]] = self._encode(keys)

    def keep(self, index: torch.Tensor, capacity: int | None = None) -> None:
        """Keep only the tokens at slots ``index``, in that order: (n,) for all heads alike, or (H, n) per head.

        With ``capacity``, the block is reallocated to that many slots (at least the kept count).
        """
        keys, values, positions = self.stored()  # rows move with their scales: no decode
        if index.dim() == 1:
            kept = (keys.index_select(2, index), values.index_select(2, index), positions.index_select(1, index))
            kept_scores = self.scores[:, : self.length].index_select(1, index)
        elif self.scores.shape[0]:
            raise ValueError("per-head keep is not supported with scores")
        else:
            gather = index[None, :, :, None].expand(1, -1, -1, self.row_width)
            kept = (keys.gather(2, gather), values.gather(2, gather), positions.gather(1, index))
            kept_scores = self.scores[:, :0]
        n = kept[0].shape[2]
        self.length = 0
        if capacity is not None and max(capacity, n) != self.capacity:
            self._reallocate(max(capacity, n))
        self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :n] = kept
        self.scores[:, : kept_scores.shape[1]] = kept_scores
        self.length = n


class ConcatKVBuffer(KVBuffer):
    """The transformers ``DynamicCache`` way, for comparison: every append allocates a new block of exactly the new
    length and copies everything into it (what ``torch.cat`` per step does)."""

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self._reallocate(self.length + keys.shape[2])
        super().append(keys, values, positions)

    def reserve(self, tokens: int) -> None:
        """A concatenating cache cannot reserve."""


def _resolve(name: KVFormat | str | None, dtype: torch.dtype) -> KVFormat:
    """The buffer's format; a format made for another compute dtype keeps its storage and takes ``dtype``."""
    fmt = kv_format(name, dtype)
    return fmt if fmt.compute == dtype else KVFormat(fmt.name, dtype)
