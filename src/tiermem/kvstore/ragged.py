"""Per-head KV blocks of different lengths: a layer whose KV heads keep different numbers of tokens (AdaKV)."""

from __future__ import annotations

import dataclasses

import torch

from tiermem.kvstore.dense import KVBuffer
from tiermem.layer_info import LayerInfo
from tiermem.memory.layer import buffer_attention


class RaggedKV:
    """One single-head :class:`KVBuffer` per KV head, so memory follows each head's own token count.

    Attention loops over the KV heads, each with its own group of query heads (a head's ``group_size`` queries read
    only that head's keys, as GQA does); decoded tokens are appended to every head.
    """

    def __init__(self, heads: list[KVBuffer]):
        self.heads = heads

    @classmethod
    def from_dense(cls, buffer: KVBuffer, index: list[torch.Tensor], headroom: int) -> RaggedKV:
        """Copy the slots ``index[h]`` (n_h,) of head h out of ``buffer``, each head with ``headroom`` free slots."""
        keys, values, positions = buffer.view()
        heads = []
        for h, slots in enumerate(index):
            head = KVBuffer(1, buffer.head_dim, buffer.dtype, kv_format=buffer.format)
            head.reserve(slots.shape[0] + headroom)
            head.append(keys[:, h : h + 1, slots], values[:, h : h + 1, slots], positions[h, slots])
            heads.append(head)
        return cls(heads)

    @property
    def lengths(self) -> list[int]:
        return [head.length for head in self.heads]

    @property
    def nbytes(self) -> int:
        return sum(head.nbytes for head in self.heads)

    @property
    def peak_nbytes(self) -> int:
        return sum(max(head.peak_nbytes, head.nbytes) for head in self.heads)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Add T tokens to every head: ``keys``/``values`` (1, Hkv, T, D) rotated, ``positions`` (T,)."""
        for h, head in enumerate(self.heads):
            head.append(keys[:, h : h + 1], values[:, h : h + 1], positions)

    def attend(self, q: torch.Tensor, q_pos: torch.Tensor, info: LayerInfo) -> torch.Tensor:
        """Attention of rotated queries ``q`` (1, Hq, T, D) at ``q_pos`` (T,) over each head's keys: (1, Hq, T, D)."""
        group = info.group_size
        one_head = dataclasses.replace(info, num_heads=group, num_kv_heads=1)
        outs = []
        for h, head in enumerate(self.heads):
            outs.append(buffer_attention(q[:, h * group : (h + 1) * group], head, q_pos, one_head))
        return torch.cat(outs, dim=1)
