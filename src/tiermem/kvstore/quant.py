"""How one layer's K and V rows are stored: a float dtype, or int8 with the scale beside the values.

A stored row is one head's key (or value) vector of one token. Float formats store it cast (``float32``,
``bfloat16``, ``float16``); ``int8`` stores ``D`` int8 values followed by their float32 scale (4 bytes), so a row is
``D + 4`` bytes and every operation a buffer does on rows (grow, compact, gather per head, page, save) moves the
scale with its values. This is llama.cpp's ``Q8_0`` block layout (``{d, qs[32]}``), with one block per head vector.

Scales are per token and per head, for keys and values alike (symmetric absmax / 127). KIVI (arXiv 2402.02750)
quantizes keys per channel (over groups of tokens, with a float residual of recent tokens) because keys have outlier
channels; that matters at 2 bits. At 8 bits per-token keys measured no perplexity cost on SmolLM2 (BENCHMARKS.md),
and a per-token layout survives tiermem's compactions (a kept token keeps its own scale, where per-channel group
scales would have to be recomputed after every eviction), so we chose it; a KIVI layout would be a named variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.errors import TiermemError

KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SCALE_BYTES = 4  # one float32 per row


@dataclass(frozen=True)
class KVFormat:
    """The storage format of K/V rows for a model computing in ``compute`` dtype. ``name`` is resolved (never
    ``auto``)."""

    name: str
    compute: torch.dtype

    @property
    def quantized(self) -> bool:
        return self.name == "int8"

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.quantized else _FLOATS[self.name]

    @property
    def plain(self) -> bool:
        """Rows are stored exactly as attention computes (no conversion anywhere)."""
        return not self.quantized and self.storage_dtype == self.compute

    def row_width(self, head_dim: int) -> int:
        """Elements of ``storage_dtype`` per stored row."""
        return head_dim + _SCALE_BYTES if self.quantized else head_dim

    def row_bytes(self, head_dim: int) -> int:
        return self.row_width(head_dim) * self.storage_dtype.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``x`` (..., D) in any float dtype -> stored rows (..., row_width)."""
        if not self.quantized:
            return x.to(self.storage_dtype)
        # Four operations fewer than the plain form (a decode step appends in every layer): the largest |x| in one
        # kernel, computed in float32 (exact: a maximum rounds nothing); x / scale is float32 by type promotion;
        # |x / scale| <= 127 by the scale's construction, so the rounded values need no clamp.
        amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
        scale = (amax / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(x / scale).to(torch.int8)
        return torch.cat([q, scale.view(torch.int8)], dim=-1)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 stored rows (..., D + 4) -> int8 values (..., D) and float32 scales (..., 1), both views."""
        d = rows.shape[-1] - _SCALE_BYTES
        scale_bytes = rows[..., d:]
        try:  # a view when the row stride keeps the scale 4-byte aligned (D a multiple of 4)
            scale = scale_bytes.view(torch.float32)
        except RuntimeError:
            scale = scale_bytes.contiguous().view(torch.float32)
        return rows[..., :d], scale

    def decode(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Stored rows (..., row_width) -> float rows (..., D) in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute
        if not self.quantized:
            return rows.to(dtype)
        values, scale = self.split(rows)
        return (values.to(torch.float32) * scale).to(dtype)


def kv_format(name: str | KVFormat | None, compute: torch.dtype) -> KVFormat:
    """The :class:`KVFormat` named ``name`` (``auto`` or None: the compute dtype itself)."""
    if isinstance(name, KVFormat):
        return name
    if name is None or name == "auto":
        names = {dtype: key for key, dtype in _FLOATS.items()}
        if compute not in names:
            raise TiermemError(f"no KV format stores the compute dtype {compute}")
        return KVFormat(names[compute], compute)
    if name not in KV_DTYPES:
        raise TiermemError(f"unknown KV dtype '{name}': use one of {', '.join(KV_DTYPES)}")
    return KVFormat(name, compute)
