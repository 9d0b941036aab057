"""Per-layer KV memory: the object a policy builds for each attention layer.

A :class:`TierLayer` receives each forward's pre-RoPE queries, keys and values from tiermem's attention forward
(:mod:`tiermem.attention`), decides what to store and how to rotate it, and returns the attention output. It is also
a transformers cache layer, so an HF ``Cache`` container (and ``model.generate``) can carry it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from tiermem.kvstore import make_buffer
from tiermem.kvstore.dense import KVBuffer
from tiermem.kvstore.quant_attention import int8_attention
from tiermem.layer_info import LayerInfo
from tiermem.masking import visible_keys
from tiermem.prefill_attention import causal_prefill
from tiermem.rope import apply_rope, apply_rope_pair

DEFAULT_CHUNK_TOKENS = 512  # prefill chunk size unless the run says otherwise (GenerationConfig.chunk_size)

if TYPE_CHECKING:
    from tiermem.kvstore.blocks import BlockStore
    from tiermem.kvstore.meter import MemoryMeter


def attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    info: LayerInfo,
    past_only: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention of new queries over stored keys, with GQA and masking by position.

    Shapes: ``q`` (1, Hq, T, D); ``keys``/``values`` (1, Hkv, S, D); ``q_pos`` (T,) and ``k_pos`` (S,) are the
    positions used for the causal (and sliding-window) rule (``past_only``: see :func:`visible_keys`). Returns
    (1, Hq, T, D). A decode step (T = 1) may pass ``keys`` with more rows than ``values`` (a buffer's whole block,
    :meth:`KVBuffer.decode_keys`): rows past S are ignored.
    """
    t = q.shape[2]
    if t > 1 and (fast := causal_prefill(q, keys, values, q_pos, k_pos, info)) is not None:
        return fast  # a prefill chunk in the plain causal layout: no (T, S) mask
    mask = visible_keys(q_pos, k_pos, info, past_only)
    if info.softcap is not None or (t == 1 and q.dtype != torch.float32):
        return _eager_attention(q, keys, values, mask, info)
    keys = keys[:, :, : values.shape[2]]  # a decode step may pass a whole block (see above)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=info.scaling, enable_gqa=True)


def buffer_attention(
    q: torch.Tensor,
    buffer: KVBuffer,
    q_pos: torch.Tensor,
    info: LayerInfo,
    k_pos: torch.Tensor | None = None,
    past_only: bool = False,
) -> torch.Tensor:
    """:func:`attention` of ``q`` (1, Hq, T, D) over everything ``buffer`` holds, read in its storage format;
    ``k_pos`` (S,) overrides the buffer's positions for masking (default: its first head's); ``past_only``: every
    stored key is at or before the queries (:func:`tiermem.masking.visible_keys`).

    Rows stored as computed go straight to SDPA; rows in another float dtype are attended in that dtype (``q`` is
    cast to it, as llama.cpp converts Q to its F16 cache's type), so the cache is never widened; int8 rows are
    decoded a chunk at a time (:func:`tiermem.kvstore.quant_attention.int8_attention`).
    """
    keys, values, positions = buffer.stored()
    k_pos = positions[0] if k_pos is None else k_pos
    fmt = buffer.format
    if fmt.quantized:
        return int8_attention(q, keys, values, fmt, q_pos, k_pos, info, past_only=past_only)
    if q.shape[2] == 1:
        keys = buffer.decode_keys()
    if fmt.plain:
        return attention(q, keys, values, q_pos, k_pos, info, past_only)
    return attention(q.to(keys.dtype), keys, values, q_pos, k_pos, info, past_only).to(q.dtype)


def _eager_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, info: LayerInfo
) -> torch.Tensor:
    """Attention written out as transformers' eager path computes it (logits in ``q``'s dtype, softmax in float32).

    Taken for Gemma2-style ``tanh`` soft-capping, which SDPA cannot express, and for a decode step (one query) in
    half precision, where SDPA's CPU kernels are slower than these few operations: per layer of SmolLM2, 4,096
    keys, bfloat16 SDPA 3,902 us against 322 here at 1 thread, 2,255 against 404 at 2 threads (float32 SDPA takes
    501 and 318, so float32 keeps it; BENCHMARKS.md, "Decode attention at one query"). Logits are rounded to the half
    dtype as in transformers' eager attention (SDPA accumulates them in float32): a softmax error of about 1% at
    logits of 10.
    """
    _, _, t, d = q.shape
    grouped = q.reshape(1, info.num_kv_heads, info.group_size * t, d)  # (1, Hkv, G*T, D)
    logits = (grouped @ keys.transpose(-1, -2))[..., : values.shape[2]] * info.scaling
    if info.softcap is not None:
        logits = torch.tanh(logits / info.softcap) * info.softcap
    if mask is not None:
        logits = logits.view(1, info.num_kv_heads, info.group_size, t, -1).masked_fill(~mask, float("-inf"))
        logits = logits.view(1, info.num_kv_heads, info.group_size * t, -1)
    probs = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ values).view(1, info.num_heads, t, d)


class TierLayer(CacheLayerMixin):
    """One layer's KV memory under a policy. ``seen`` counts the tokens the layer was given (its logical length)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, info: LayerInfo):
        super().__init__()
        self.info = info
        self.seen = 0
        self.context_tokens: int | None = None  # set by plan(): how long the context will be
        self.total_tokens: int | None = None  # set by plan(): context, question and new tokens together
        self.chunk_tokens = DEFAULT_CHUNK_TOKENS  # set by plan(): tokens per prefill forward
        self.end_context_after_prefill = False  # context-manager mode: compress after generate()'s prefill forward
        self.meter: MemoryMeter | None = None  # set by a TierCache: this layer reports its bytes there
        self.probe_start: int | None = None  # set while a probe forward runs (see probe)
        self.is_initialized = True

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's tokens as the policy sees fit and attend.

        ``q`` (1, Hq, T, D), ``k`` and ``v`` (1, Hkv, T, D), all before RoPE. Returns (1, Hq, T, D).
        """

    def probe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend tokens at positions ``probe_start``, ... without storing anything (a look at the question before
        it is read: "heads" retrieval). Shapes as :meth:`attend`."""
        raise NotImplementedError(f"{type(self).__name__} cannot probe")

    def probe_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        k_pos: torch.Tensor,
    ) -> torch.Tensor:
        """The probe's queries (1, Hq, T, D) at positions ``probe_start``... over stored rotated ``keys``/``values``
        (1, Hkv, S, D) at positions ``k_pos`` (S,), plus the probe's own keys at positions not seen yet."""
        assert self.probe_start is not None
        t, start = q.shape[2], self.probe_start
        cos, sin = self.info.rope.cos_sin_range(start, t)
        q_pos = torch.arange(start, start + t)
        new = q_pos >= self.seen
        if bool(new.any()):
            keys = torch.cat([keys, apply_rope(k, cos, sin)[:, :, new]], dim=2)
            values = torch.cat([values, v[:, :, new]], dim=2)
            k_pos = torch.cat([k_pos, q_pos[new]])
        return attention(apply_rope(q, cos, sin), keys, values, q_pos, k_pos, self.info)

    def bind(self, store: BlockStore) -> None:
        """Receive the cache's block store: report bytes to its meter (block-memory layers also store blocks)."""
        self.meter = store.meter

    def report(self) -> None:
        """Tell the meter how many bytes this layer holds now (called after every forward and compression)."""
        if self.meter is not None:
            self.meter.set(self.info.layer_idx, self.kv_bytes())

    def plan(self, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        """Hint before the first token: the context has ``context_tokens``, the whole run at most ``total_tokens``,
        and prefill arrives ``chunk_tokens`` at a time (buffers that evict after each forward must hold a chunk)."""
        self.context_tokens = context_tokens
        self.total_tokens = total_tokens
        self.chunk_tokens = chunk_tokens

    def headroom(self) -> int:
        """Token slots still to come after the context (question and new tokens), as planned; 64 if unplanned."""
        if self.total_tokens is None or self.context_tokens is None:
            return 64
        return max(self.total_tokens - self.context_tokens, 0)

    def end_context(self) -> None:
        """The context is in: compress it if the policy compresses prompts (SnapKV). Default: nothing."""

    def decode_buffer(self) -> KVBuffer | None:
        """The buffer a decode step appends its token to and attends in full, when that is all this layer's decode
        step does now (the fused step may then run it: :mod:`tiermem.decode_step`); None otherwise (default)."""
        return None

    @abstractmethod
    def kv_tokens(self) -> int:
        """Tokens whose K and V this layer holds now."""

    @abstractmethod
    def kv_bytes(self) -> int:
        """Bytes allocated for this layer's KV memory now."""

    @abstractmethod
    def kv_bytes_peak(self) -> int:
        """Most bytes this layer's KV memory has held at once."""

    # The transformers cache-layer contract. Masks are never built for tiermem layers (see tiermem.attention).
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("tiermem layers are filled by tiermem's attention forward; run under a policy")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


class DenseLayer(TierLayer):
    """Keys rotated once at their original positions and kept in a dense :class:`KVBuffer` (kvpress's convention).

    Subclasses evict by overriding :meth:`after_attend` (every forward) or :meth:`end_context` (once).
    """

    def __init__(self, info: LayerInfo):
        super().__init__(info)
        self.buffer = KVBuffer(info.num_kv_heads, info.head_dim, info.dtype, kv_format=info.kv_dtype)

    def plan(self, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().plan(context_tokens, total_tokens, chunk_tokens)
        self.buffer.reserve(self.reserve_hint(context_tokens, total_tokens))

    def reserve_hint(self, context_tokens: int, total_tokens: int) -> int:
        """How many token slots to allocate up front."""
        return total_tokens

    def append_rotated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate this step's queries and keys at their original positions and store the keys and values.

        Returns the rotated queries (1, Hq, T, D) and their positions (T,).
        """
        t = q.shape[2]
        cos, sin = self.info.rope.cos_sin_range(self.seen, t)
        q, k = apply_rope_pair(q, k, cos, sin)
        q_pos = torch.arange(self.seen, self.seen + t)
        self.buffer.append(k, v, q_pos)
        self.seen += t
        return q, q_pos

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, q_pos = self.append_rotated(q, k, v)
        out = buffer_attention(q, self.buffer, q_pos, self.info, past_only=True)  # keys at their own positions
        self.after_attend(q)
        return out

    def after_attend(self, rotated_q: torch.Tensor) -> None:
        """Hook after each forward, with this step's rotated queries (1, Hq, T, D). Default: keep everything."""

    def decode_buffer(self) -> KVBuffer | None:
        """The buffer, unless a subclass changes what a step does (its own ``attend`` or ``after_attend``)."""
        kind = type(self)
        plain = kind.attend is DenseLayer.attend and kind.after_attend is DenseLayer.after_attend
        return self.buffer if plain else None

    def probe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend over the buffer plus, for this call only, the probe's tokens not stored yet."""
        keys, values, positions = self.buffer.view()
        return self.probe_attention(q, k, v, keys, values, positions[0])

    def bind(self, store: BlockStore) -> None:
        super().bind(store)
        if store.config.allocator != "grow":  # before any token arrives, swap in the chosen kind of buffer
            assert self.buffer.length == 0
            self.buffer = make_buffer(
                store.config.allocator,
                self.info.num_kv_heads,
                self.info.head_dim,
                self.info.dtype,
                kv_format=self.info.kv_dtype,
            )

    def kv_tokens(self) -> int:
        return self.buffer.length

    def kv_bytes(self) -> int:
        return self.buffer.nbytes

    def kv_bytes_peak(self) -> int:
        return max(self.buffer.peak_nbytes, self.buffer.nbytes)


class SlidingWindowLayer(DenseLayer):
    """A local-attention layer (Gemma3, Mistral): only the last ``sliding_window`` positions are ever read.

    Out-of-window keys are masked at once but evicted lazily, ``slack`` tokens at a time, so decoding does not copy
    the window every step. Every policy uses this for local layers; policies act on global layers only (as kvpress).
    """

    is_sliding = True
    slack = 256

    def reserve_hint(self, context_tokens: int, total_tokens: int) -> int:
        assert self.info.sliding_window is not None
        return min(total_tokens, self.info.sliding_window + self.slack + self.chunk_tokens)

    def after_attend(self, rotated_q: torch.Tensor) -> None:
        assert self.info.sliding_window is not None
        keep = self.info.sliding_window - 1
        n = self.buffer.length
        if n > keep + self.slack:
            self.buffer.keep(torch.arange(n - keep, n))
