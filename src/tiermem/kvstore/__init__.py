"""Where KV bytes live: dense blocks in RAM (growing, demand-paged, or concatenated) and the block store."""

from __future__ import annotations

import torch

from tiermem.kvstore.dense import ConcatKVBuffer, KVBuffer
from tiermem.kvstore.paged import PagedKVBuffer
from tiermem.kvstore.quant import KVFormat

ALLOCATORS = {"grow": KVBuffer, "paged": PagedKVBuffer, "concat": ConcatKVBuffer}


def make_buffer(
    allocator: str,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    score_rows: int = 0,
    kv_format: KVFormat | str | None = None,
) -> KVBuffer:
    """A KV buffer of the named kind: ``grow`` (geometric, default), ``paged`` (demand-paged virtual memory) or
    ``concat`` (reallocate on every append, as transformers' DynamicCache); rows stored in ``kv_format``."""
    return ALLOCATORS[allocator](num_heads, head_dim, dtype, score_rows=score_rows, kv_format=kv_format)


__all__ = ["ALLOCATORS", "ConcatKVBuffer", "KVBuffer", "PagedKVBuffer", "make_buffer"]
