"""Attention over int8 K/V rows without widening the whole cache: chunks decoded one at a time, merged online.

Keys and values stay int8 (:mod:`tiermem.kvstore.quant`). Each chunk of at most ``chunk_tokens`` tokens is converted
to float32 and its per-token scales are folded in where they cost least: the key scales multiply the chunk's logits
(``q . (s_k k) = s_k (q . k)``) and the value scales multiply the probabilities (``sum_j p_j s_j v_j``), so no
scaled copy of a chunk is made. Chunks are merged by the running maximum and sum of the softmax (the online softmax
of FlashAttention), so the result equals one softmax over all keys. Arithmetic is float32 whatever the model's dtype,
except a bfloat16 model's decode step over many keys (:data:`HALF_DECODE_MIN_KEYS`), whose K and V are converted to
bfloat16 (logits and probabilities rounded as transformers' bf16 eager attention rounds them; softmax in float32).

A prefill chunk in the plain causal layout (:mod:`tiermem.prefill_attention`) takes another route: the past is
decoded 8k keys at a time into the query's dtype and read by the CPU flash kernel without a mask,
the chunk's own keys with its causal kernel, all merged by log-sum-exp. A chunk of T queries reads S keys, so
decoding (S rows) is cheap beside the T x S logits that the online loop would compute with plain matmuls.
"""

from __future__ import annotations

import torch

from tiermem.kvstore.quant import KVFormat
from tiermem.layer_info import LayerInfo
from tiermem.masking import visible_keys
from tiermem.prefill_attention import causal_prefill

# A bfloat16 model's decode step over at least this many keys converts them to bfloat16, not float32: half the bytes
# written and read, at transformers' bf16 eager rounding (logits and probabilities in bf16). Per layer of SmolLM2,
# quiet machine (BENCHMARKS.md, "Decode attention at one query"), float32 against bfloat16 conversion: 2 threads
# 512 keys 208 / 199 us, 1k 332 / 262, 4k 1039 / 586; 1 thread 512 125 / 171, 1k 202 / 227, 2k 338 / 337, 4k 643 /
# 571. The threshold sits where 2 threads (the default on this machine) gain and 1 thread loses least.
HALF_DECODE_MIN_KEYS = 1024
MAX_CHUNK_TOKENS = 8192  # a decode step at 8k reads one chunk: 2 x Hkv x 8192 x D float32 (12 MiB for SmolLM2)
LOGITS_BUDGET = 1 << 22  # float32 logits per chunk at most (16 MiB): long prefill chunks take fewer keys per step


def chunk_tokens_for(num_heads: int, queries: int) -> int:
    """Keys per chunk: as many as the logits budget allows for ``num_heads x queries`` query rows."""
    return max(256, min(MAX_CHUNK_TOKENS, LOGITS_BUDGET // max(num_heads * queries, 1)))


def int8_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    fmt: KVFormat,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    info: LayerInfo,
    chunk_tokens: int | None = None,
    past_only: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention of ``q`` (1, Hq, T, D) over int8 rows ``keys``/``values`` (1, Hkv, S, D + 4),
    with GQA, causal and sliding-window masking by position (``q_pos`` (T,), ``k_pos`` (S,);
    ``past_only``: :func:`tiermem.masking.visible_keys`) and soft-capping, as :func:`tiermem.memory.layer.attention`.
    Returns (1, Hq, T, D) in ``q``'s dtype."""
    _, hq, t, d = q.shape
    hkv, g, s = info.num_kv_heads, info.group_size, keys.shape[2]
    if t > 1:  # a prefill chunk in the plain causal layout decodes its rows into the fast path
        fast = causal_prefill(q, keys, values, q_pos, k_pos, info, lambda rows: fmt.decode(rows, q.dtype))
        if fast is not None:
            return fast
    chunk = chunk_tokens or chunk_tokens_for(hq, t)
    if s <= chunk:  # one chunk (every decode step up to 8k keys): one softmax, no running statistics
        half = t == 1 and q.dtype == torch.bfloat16 and s >= HALF_DECODE_MIN_KEYS
        grouped = (q if half else q.float()).reshape(1, hkv, g * t, d)
        return _one_chunk(grouped, keys, values, fmt, q_pos, k_pos, info, past_only).view(1, hq, t, d).to(q.dtype)
    grouped = q.float().reshape(1, hkv, g * t, d)  # query heads of one KV head are adjacent (GQA's layout)
    running_max = torch.full((1, hkv, g * t, 1), float("-inf"))
    running_sum = torch.zeros(1, hkv, g * t, 1)
    acc = torch.zeros(1, hkv, g * t, d)
    for start in range(0, s, chunk):
        end = min(s, start + chunk)
        logits = _chunk_logits(grouped, keys[:, :, start:end], fmt, q_pos, k_pos[start:end], info, past_only)
        v_int, v_scale = fmt.split(values[:, :, start:end])
        new_max = torch.maximum(running_max, logits.amax(dim=-1, keepdim=True))
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows that saw no visible key yet
        probs = torch.exp(logits - shift)
        correction = torch.exp(running_max - shift)
        running_sum = running_sum * correction + probs.sum(dim=-1, keepdim=True)
        acc = acc * correction + (probs * v_scale.transpose(-1, -2)) @ v_int.to(torch.float32)
        running_max = new_max
    return (acc / running_sum).view(1, hq, t, d).to(q.dtype)


def _chunk_logits(
    grouped: torch.Tensor,
    keys: torch.Tensor,
    fmt: KVFormat,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    info: LayerInfo,
    past_only: bool = False,
) -> torch.Tensor:
    """Scaled, soft-capped and masked float32 logits (1, Hkv, G*T, C) of ``grouped`` queries (1, Hkv, G*T, D) over
    int8 ``keys`` (1, Hkv, C, D + 4) at positions ``k_pos`` (C,)."""
    hkv, g, t = info.num_kv_heads, info.group_size, q_pos.shape[0]
    k_int, k_scale = fmt.split(keys)  # (1, Hkv, C, D) int8, (1, Hkv, C, 1) float32
    logits = grouped @ k_int.to(grouped.dtype).transpose(-1, -2)
    logits = logits * (k_scale.transpose(-1, -2) * info.scaling)  # float32 from here on
    if info.softcap is not None:
        logits = torch.tanh(logits / info.softcap) * info.softcap
    visible = visible_keys(q_pos, k_pos, info, past_only)  # (T, C), or None: every key visible to every query
    if visible is not None:
        logits = logits.view(1, hkv, g, t, -1).masked_fill(~visible, float("-inf")).view(1, hkv, g * t, -1)
    return logits


def _one_chunk(
    grouped: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    fmt: KVFormat,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    info: LayerInfo,
    past_only: bool = False,
) -> torch.Tensor:
    """:func:`int8_attention` when all keys fit one chunk: ``grouped`` (1, Hkv, G*T, D) -> (1, Hkv, G*T, D) in
    ``grouped``'s dtype, which is also the one K and V are converted to (float32, or bfloat16 for a long decode
    step: :data:`HALF_DECODE_MIN_KEYS`); the softmax is float32 either way. The same arithmetic as the loop's first
    step in fewer operations (a decode step's Python and dispatch cost is per operation)."""
    probs = _chunk_logits(grouped, keys, fmt, q_pos, k_pos, info, past_only).softmax(dim=-1)
    v_int, v_scale = fmt.split(values)
    return (probs * v_scale.transpose(-1, -2)).to(grouped.dtype) @ v_int.to(grouped.dtype)
