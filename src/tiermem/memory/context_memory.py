"""Block memory for contexts longer than the trained window: the machinery InfLLM and EM-LLM share.

Each token of a layer passes through three places:

- the **local window**: the last ``n_local`` tokens, keys rotated at their absolute positions. Attention to it uses
  ordinary relative RoPE (angles are computed in float64, so absolute positions past 100k stay exact).
- the **remainder**: tokens that left the window but do not form a block yet (keys un-rotated).
- **memory**: the first ``n_init`` tokens to leave the window (kept hot), then blocks put in the
  :class:`~tiermem.kvstore.blocks.BlockStore` (RAM or disk), each with one representative key vector.

A query attends, in one softmax, to its local window and to a global set: the init tokens, the retrieved blocks,
the remainder, and any window tokens it is already too far from. The global set is attended with the query rotated
at one fixed angle (``n_local - 1``) against un-rotated keys, so every memory token sits at the same distance and no
position ever exceeds ``n_local + exc_block_size``: a model trained on 8k tokens reads 128k. With
``memory_positions="ordered"`` (a tiermem variant) the global set is instead laid out in position order just before
the window, at distances ``n_local`` to ``n_local + n - 1`` for ``n`` memory tokens: still bounded, and when every
block is retrieved a decoding query sees each token at its true distance.

Subclasses decide how the remainder is cut into blocks (:meth:`cut_blocks`) and which blocks a query retrieves
(:meth:`retrieve`).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tiermem.errors import TiermemError
from tiermem.kvstore import make_buffer
from tiermem.kvstore.blocks import BlockStore, StoreConfig
from tiermem.kvstore.dense import KVBuffer
from tiermem.layer_info import LayerInfo
from tiermem.memory.base import Policy
from tiermem.memory.head_retrieval import SharedRetrieval
from tiermem.memory.joint_attention import joint_attention
from tiermem.memory.layer import DEFAULT_CHUNK_TOKENS, TierLayer
from tiermem.memory.retrieval_heads import retrieval_heads
from tiermem.rope import apply_rope, unapply_rope


@dataclass
class ContextMemoryPolicy(Policy):
    """Fields shared by block-memory policies (defaults: the published configs for 8k-token models)."""

    n_init: int = 128
    n_local: int = 4096
    repr_topk: int = 4
    exc_block_size: int = 512
    # "fixed" (the papers'): every memory token at one distance, ``n_local``, from every query. "ordered" (a
    # tiermem variant): memory tokens keep their order, consecutive positions just before the local window, so a
    # small model can read a multi-token fact (a number split into digit tokens) in the right order.
    memory_positions: str = "fixed"
    # "mean" (the papers'): each layer retrieves with each execution block's mean query against one representative
    # key per block. "heads" (a tiermem variant, tiermem.memory.head_retrieval): the question's queries in the
    # model's calibrated retrieval heads pick one block set, by max q.k, for every layer and the whole answer.
    retrieval: str = "mean"
    retrieval_heads: int = 8  # how many calibrated heads vote ("heads" retrieval)
    neighbours: int = 0  # blocks after each retrieved block also attended ("heads" retrieval)

    fits_any_length = True
    hot_set = "local windows, prefill chunk, init tokens and retrieved blocks"

    def check_memory_positions(self) -> None:
        if self.memory_positions not in ("fixed", "ordered"):
            raise TiermemError(f"memory_positions must be 'fixed' or 'ordered', not {self.memory_positions!r}")
        if self.retrieval not in ("mean", "heads"):
            raise TiermemError(f"retrieval must be 'mean' or 'heads', not {self.retrieval!r}")
        if self.retrieval_heads < 1 or self.neighbours < 0:
            raise TiermemError("retrieval_heads must be at least 1 and neighbours at least 0")

    @property
    def probes_question(self) -> bool:
        return self.retrieval == "heads"

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Find the model's retrieval heads (calibrated once per model, cached on disk) for "heads" retrieval."""
        if self.retrieval != "heads":
            return
        if tokenizer is None:
            raise TiermemError(f"policy '{self.name}' with heads retrieval needs the tokenizer to calibrate")
        self._heads = retrieval_heads(model, tokenizer, self.retrieval_heads)

    def setup(self, layers: list[TierLayer], store: BlockStore) -> None:
        super().setup(layers, store)
        heads = getattr(self, "_heads", None)
        if heads is not None:
            shared = SharedRetrieval(heads, self.neighbours)
            for layer in layers:
                if isinstance(layer, ContextMemoryLayer):
                    layer.shared = shared

    def after_probe(self, layers: list[TierLayer]) -> None:
        """One block set for every layer from the probe's retrieval-head queries."""
        memory_layers = [layer for layer in layers if isinstance(layer, ContextMemoryLayer)]
        if not memory_layers or memory_layers[0].shared is None:
            return
        chosen = memory_layers[0].shared.decide(memory_layers, memory_layers[0].choose)
        for layer in memory_layers:  # None (nothing to decide): each layer keeps retrieving its own way
            layer.fixed_blocks = chosen

    def global_capacity(self) -> int:
        """Most tokens a query may retrieve from memory (for sizing and the memory check)."""
        raise NotImplementedError

    def fewest_block_tokens(self) -> int:
        """Fewest tokens a memory block can hold, for sizing the hot retrieval keys (one per block): with it the
        memory check is a bound the run cannot exceed."""
        raise NotImplementedError

    def local_slots(self) -> int:
        """Window buffer size: the window, a chunk, and up to one chunk of graduated tokens awaiting compaction."""
        return self.n_local + 2 * self.exc_block_size

    def peak_bytes(
        self, info: LayerInfo, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> int:
        # Prefill chunks are attended exc_block_size tokens at a time (ContextMemoryLayer.attend): the engine's
        # chunk size does not change what global layers hold.
        if info.sliding_window is not None:
            return super().peak_bytes(info, context_tokens, total_tokens, chunk_tokens)
        kv = info.kv_bytes_per_token()
        window = min(total_tokens, self.local_slots()) * (kv + 8 * info.num_kv_heads + 4 * info.num_heads)
        # init, retrieved set, remainder and edge tokens (the remainder is bounded by a block plus a chunk)
        memory = (self.n_init + self.global_capacity() + self.exc_block_size) * kv
        # one retrieval key (all query heads) per block stays hot: it grows with the context, blocks do not
        repr_bytes = (total_tokens // self.fewest_block_tokens()) * kv * info.num_heads // (2 * info.num_kv_heads)
        return window + min(memory, total_tokens * kv) + repr_bytes


class ContextMemoryLayer(TierLayer):
    """One layer's window, remainder and block memory. See the module docstring."""

    def __init__(self, info: LayerInfo, policy: ContextMemoryPolicy):
        super().__init__(info)
        self.policy = policy
        hkv, d, dtype = info.num_kv_heads, info.head_dim, info.dtype
        self.local = KVBuffer(hkv, d, dtype, score_rows=info.num_heads, kv_format=info.kv_dtype)
        self.graduated = 0  # tokens at positions below this have left the local window
        self.init_k = torch.empty(1, hkv, 0, d, dtype=dtype)
        self.init_v = torch.empty(1, hkv, 0, d, dtype=dtype)
        self.rem_k = torch.empty(1, hkv, 0, d, dtype=dtype)
        self.rem_v = torch.empty(1, hkv, 0, d, dtype=dtype)
        self.rem_scores = torch.empty(info.num_heads, 0)
        self.rem_start = 0  # position of the first remainder token
        self.block_starts: list[int] = []  # position of each block's first token
        self.block_sizes: list[int] = []
        self.reprs = torch.empty(0, info.num_heads * d, dtype=dtype)  # one retrieval key per block
        self.store: BlockStore | None = None
        self._assembled: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None
        self.last_retrieved: list[int] = []
        self.shared: SharedRetrieval | None = None  # set by the policy for "heads" retrieval
        self.fixed_blocks: list[int] | None = None  # the shared decision, once the question was probed
        self._peak = 0

    # -- setup ---------------------------------------------------------------------------------------------------
    def bind(self, store: BlockStore) -> None:
        super().bind(store)
        self.store = store
        if store.config.allocator != "grow":
            info = self.info
            self.local = make_buffer(
                store.config.allocator, info.num_kv_heads, info.head_dim, info.dtype, info.num_heads, info.kv_dtype
            )

    def plan(self, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().plan(context_tokens, total_tokens, chunk_tokens)
        self.local.reserve(min(total_tokens, self.policy.local_slots()))

    # -- policy hooks -------------------------------------------------------------------------------------------
    @abstractmethod
    def cut_blocks(self, final: bool) -> list[int]:
        """Sizes of the blocks to cut from the front of the remainder now (the rest waits for more tokens)."""

    @abstractmethod
    def retrieve(self, query: torch.Tensor, length: int) -> list[int]:
        """Block ids to attend for one execution block, given its mean global query (Hq*D,) and its length."""

    @abstractmethod
    def choose(self, order: list[int]) -> list[int]:
        """The blocks to retrieve given all block ids best first (the policy's budget: top-k, or a token fill)."""

    # -- the forward --------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        step = self.policy.exc_block_size
        outs = [
            self._attend_block(q[:, :, s : s + step], k[:, :, s : s + step], v[:, :, s : s + step])
            for s in range(0, q.shape[2], step)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_block(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, start, n_local = q.shape[2], self.seen, self.policy.n_local
        rope = self.info.rope
        cos, sin = rope.cos_sin_range(start, t)
        q_pos = torch.arange(start, start + t)
        self.local.append(apply_rope(k, cos, sin), v, q_pos)
        self.seen += t
        keys, values, positions = self.local.view()
        k_pos = positions[0]
        dist = q_pos[:, None] - k_pos[None, :]
        alive = k_pos >= self.graduated
        local_mask = alive & (dist >= 0) & (dist < n_local)

        # Window tokens some queries of this block are already too far from: attended as memory by those queries.
        edge = alive & (k_pos <= start + t - 1 - n_local)
        edge_slots = edge.nonzero().flatten()
        fixed_cos, fixed_sin = rope.cos_sin_range(n_local - 1, 1)
        q_global = apply_rope(q, fixed_cos, fixed_sin)
        if self.fixed_blocks is not None:
            blocks = self.fixed_blocks
        else:
            blocks = self.retrieve(q_global.mean(dim=2).reshape(-1), t) if self.block_sizes else []
        self.last_retrieved = blocks
        g_keys, g_values, g_mask = self._memory(blocks, keys, values, k_pos, edge_slots, dist)
        q_memory = q_global
        if self.policy.memory_positions == "ordered" and g_keys.shape[2]:
            # Memory token j at position j, the query at n_local + n - 1: distances n_local .. n_local + n - 1.
            n = g_keys.shape[2]
            g_keys = apply_rope(g_keys, *rope.cos_sin_range(0, n))
            q_memory = apply_rope(q, *rope.cos_sin_range(n_local + n - 1, 1))

        out, received = joint_attention(
            apply_rope(q, cos, sin), keys, values, local_mask, q_memory, g_keys, g_values, g_mask, self.info.scaling
        )
        self.local.scores[:, : self.local.length] += received
        self._graduate()
        self._peak = max(self._peak, self.kv_bytes())
        return out

    def _memory(
        self,
        blocks: list[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        k_pos: torch.Tensor,
        edge_slots: torch.Tensor,
        dist: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The global keys and values (un-rotated) in position order: init, retrieved blocks, remainder, edge tokens."""
        block_k, block_v = self._blocks(blocks)
        parts_k, parts_v = [self.init_k, block_k, self.rem_k], [self.init_v, block_v, self.rem_v]
        mask = None
        if edge_slots.numel():
            cos, sin = self.info.rope.cos_sin(k_pos[edge_slots])
            parts_k.append(unapply_rope(keys[:, :, edge_slots], cos, sin))
            parts_v.append(values[:, :, edge_slots])
            n_before = sum(p.shape[2] for p in parts_k[:-1])
            mask = torch.ones(dist.shape[0], n_before + edge_slots.numel(), dtype=torch.bool)
            mask[:, n_before:] = dist[:, edge_slots] >= self.policy.n_local
        return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2), mask

    def _blocks(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieved blocks' keys and values concatenated in block order, reused while the set does not change."""
        ids = tuple(sorted(blocks))
        if not ids:
            return self.init_k[:, :, :0], self.init_v[:, :, :0]
        if self._assembled is None or self._assembled[0] != ids:
            assert self.store is not None
            loaded = [self.store.get(self.info.layer_idx, b) for b in ids]
            block_k = torch.cat([kv[0] for kv in loaded], dim=1).unsqueeze(0)
            block_v = torch.cat([kv[1] for kv in loaded], dim=1).unsqueeze(0)
            self._assembled = (ids, block_k, block_v)
        return self._assembled[1], self._assembled[2]

    # -- moving tokens out of the window ------------------------------------------------------------------------
    def _graduate(self) -> None:
        """Tokens no future query can see locally leave the window for the remainder (keys un-rotated)."""
        limit = self.seen - self.policy.n_local + 1  # future queries (>= seen) see positions above seen - n_local
        if limit <= self.graduated:
            return
        keys, values, positions = self.local.view()
        k_pos = positions[0]
        slots = ((k_pos >= self.graduated) & (k_pos < limit)).nonzero().flatten()
        cos, sin = self.info.rope.cos_sin(k_pos[slots])
        if not self.rem_k.shape[2]:
            self.rem_start = int(k_pos[slots[0]])
        self.rem_k = torch.cat([self.rem_k, unapply_rope(keys[:, :, slots], cos, sin)], dim=2)
        self.rem_v = torch.cat([self.rem_v, values[:, :, slots]], dim=2)
        self.rem_scores = torch.cat([self.rem_scores, self.local.scores[:, slots]], dim=1)
        self.graduated = limit
        first_alive = int((k_pos >= limit).nonzero()[0]) if bool((k_pos >= limit).any()) else self.local.length
        if first_alive > self.policy.exc_block_size:  # compact the window buffer once a chunk's worth is dead
            self.local.keep(torch.arange(first_alive, self.local.length))
        self._fill_init()
        self._cut(final=False)

    def _fill_init(self) -> None:
        missing = self.policy.n_init - self.init_k.shape[2]
        if missing <= 0 or not self.rem_k.shape[2]:
            return
        take = min(missing, self.rem_k.shape[2])
        self.init_k = torch.cat([self.init_k, self.rem_k[:, :, :take]], dim=2)
        self.init_v = torch.cat([self.init_v, self.rem_v[:, :, :take]], dim=2)
        self._drop_remainder(take)

    def _drop_remainder(self, n: int) -> None:
        self.rem_k, self.rem_v = self.rem_k[:, :, n:], self.rem_v[:, :, n:]
        self.rem_scores = self.rem_scores[:, n:]
        self.rem_start += n

    def _cut(self, final: bool) -> None:
        """Turn the front of the remainder into blocks: store them and compute their representative keys."""
        for size in self.cut_blocks(final):
            if self.store is None:  # context-manager mode: no TierCache bound a store, so keep blocks in RAM
                self.store = BlockStore(StoreConfig(), self.info.dtype)
            keys, values = self.rem_k[0, :, :size], self.rem_v[0, :, :size]
            block = self.store.put(self.info.layer_idx, keys.clone(), values.clone())
            assert block == len(self.block_sizes)
            self.reprs = torch.cat([self.reprs, self._representative(keys, self.rem_scores[:, :size])[None]])
            self.block_starts.append(self.rem_start)
            self.block_sizes.append(size)
            self._drop_remainder(size)

    def _representative(self, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Mean key of the ``repr_topk`` tokens that received the most attention, per query head, flattened.

        ``keys`` (Hkv, n, D), ``scores`` (Hq, n) -> (Hq*D,).
        """
        group = self.info.group_size
        expanded = keys.repeat_interleave(group, dim=0)  # (Hq, n, D)
        top = scores.topk(min(self.policy.repr_topk, scores.shape[1]), dim=-1).indices  # (Hq, r)
        chosen = expanded.gather(1, top[:, :, None].expand(-1, -1, keys.shape[-1]))
        return chosen.mean(dim=1).reshape(-1)

    # -- the question probe ("heads" retrieval) ---------------------------------------------------------------------
    def probe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend the probe's tokens (at positions ``probe_start``...) over the local window only, storing nothing,
        and hand the pre-RoPE queries (1, Hq, T, D) to the shared retrieval. Tokens at positions already seen (the
        prompt's own tail) are in the window; later ones are appended for this call only."""
        if self.shared is not None:
            self.shared.record(self.info.layer_idx, q)
        keys, values, positions = self.local.view()
        alive = positions[0] >= self.graduated
        return self.probe_attention(q, k, v, keys[:, :, alive], values[:, :, alive], positions[0, alive])

    def all_block_keys(self) -> torch.Tensor:
        """Keys (Hkv, S, D) before RoPE of every block in memory, in block order (read from the store)."""
        assert self.store is not None
        return torch.cat([self.store.get(self.info.layer_idx, b)[0] for b in range(len(self.block_sizes))], dim=1)

    # -- accounting ---------------------------------------------------------------------------------------------
    def kv_tokens(self) -> int:
        """Tokens whose K and V this layer holds in RAM outside the block store."""
        retrieved = self._assembled[1].shape[2] if self._assembled else 0
        return self.local.length + self.init_k.shape[2] + self.rem_k.shape[2] + retrieved

    def kv_bytes(self) -> int:
        """Bytes held in RAM by this layer outside the block store (window, init, remainder, retrieved set, keys)."""
        tensors = [self.init_k, self.init_v, self.rem_k, self.rem_v, self.rem_scores, self.reprs]
        if self._assembled is not None:
            tensors += [self._assembled[1], self._assembled[2]]
        return self.local.nbytes + sum(t.numel() * t.element_size() for t in tensors)

    def kv_bytes_peak(self) -> int:
        return max(self._peak, self.kv_bytes())

    def memory_tokens(self) -> int:
        """Tokens in block memory (RAM or disk) for this layer."""
        return sum(self.block_sizes)
