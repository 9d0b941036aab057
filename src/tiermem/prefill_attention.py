"""Causal prefill fast path: a chunk attends to the past without a mask and to itself with a causal kernel.

During chunked prefill a chunk of ``T`` queries reads every stored key. Under the causal rule the keys split in two:
the past (everything stored before the chunk: all visible to every query) and the chunk's own ``T`` keys (a lower
triangle). :func:`tiermem.memory.layer.attention` expresses that as one SDPA call with a (T, S) boolean mask, which
PyTorch's CPU kernel turns into an additive float mask and reads in full. Here the two parts run as two mask-free
calls of the CPU flash kernel, which also returns each row's log-sum-exp, and are merged exactly::

    out = (out_past · e^(lse_past − m) + out_own · e^(lse_own − m)) / (e^(lse_past − m) + e^(lse_own − m))

with ``m = max(lse_past, lse_own)`` (FlashAttention's merge of two softmax blocks). The past call folds the query
heads of one KV head into the query-length axis (GQA without copying the past); the own call expands the chunk's
few keys to the query heads, which costs ``T`` rows, not ``S``.

The path applies when the layout is the plain causal one: the last ``T`` stored keys are this chunk's (positions
equal the queries'), every earlier key precedes the chunk, no sliding window and no soft-capping, float32 or
bfloat16. Anything else (a decode step, a Gemma3 local layer, a policy that re-positions keys) returns ``None`` and
takes the masked path. int8 rows take the same path with a ``decode`` of their rows (see
:mod:`tiermem.kvstore.quant_attention`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tiermem.layer_info import LayerInfo

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
DTYPES = (torch.float32, torch.bfloat16)
ENABLED = True  # False: every chunk takes the masked path (the baseline of benchmarks/prefill_chunks.py --compare)

DECODED_PAST_KEYS = 8192  # past keys decoded at a time for stored formats (int8): 12 MiB of float32 for SmolLM2


def own_keys(q_pos: torch.Tensor, k_pos: torch.Tensor) -> int | None:
    """``T`` when the last ``T`` keys are the queries' own (same positions) and every earlier key precedes them;
    None otherwise. ``q_pos`` (T,), ``k_pos`` (S,)."""
    t, s = q_pos.shape[0], k_pos.shape[0]
    if t < 2 or s < t or not torch.equal(k_pos[s - t :], q_pos):
        return None
    if s > t and int(k_pos[: s - t].max()) >= int(q_pos[0]):
        return None
    if not bool((q_pos[1:] > q_pos[:-1]).all()):  # the own block's triangle needs ascending positions
        return None
    return t


def applies(q: torch.Tensor, info: LayerInfo) -> bool:
    """Whether this layer and dtype can take the fast path at all (before looking at positions)."""
    return ENABLED and _FLASH is not None and info.sliding_window is None and info.softcap is None and q.dtype in DTYPES


def flash(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, info: LayerInfo, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` (1, Hq, T, D) over ``keys``/``values`` (1, Hkv, S, D) with GQA; ``causal`` needs S == T.

    Returns the output (1, Hq, T, D) and each row's log-sum-exp of the scaled logits (1, Hq, T), float32.
    """
    assert _FLASH is not None
    _, hq, t, d = q.shape
    g = info.group_size
    if causal:  # the triangle needs one query row per head: expand the T own keys to the query heads
        keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
        out, lse = _FLASH(q, keys, values, 0.0, True, scale=info.scaling)
        return out, lse.float()
    grouped = q.reshape(1, info.num_kv_heads, g * t, d)  # query heads of one KV head are adjacent (GQA's layout)
    out, lse = _FLASH(grouped, keys, values, 0.0, False, scale=info.scaling)
    return out.reshape(1, hq, t, d), lse.reshape(1, hq, t).float()


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the union of two key sets from each set's output (1, H, T, D) and log-sum-exp (1, H, T)."""
    m = torch.maximum(lse_a, lse_b)
    m = m.masked_fill(m == float("-inf"), 0.0)  # rows that saw no key in either part
    wa, wb = (lse_a - m).exp(), (lse_b - m).exp()
    total = wa + wb
    out = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / total[..., None]
    return out.to(out_a.dtype), m + total.log()


def causal_prefill(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    info: LayerInfo,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """:func:`tiermem.memory.layer.attention` for a prefill chunk in the plain causal layout; None when it is not.

    Shapes: ``q`` (1, Hq, T, D); ``keys``/``values`` (1, Hkv, S, D) as stored; ``q_pos`` (T,), ``k_pos`` (S,).
    ``decode`` turns stored rows (int8 with their scales) into ``q``'s dtype; the past is then decoded and read
    ``DECODED_PAST_KEYS`` keys at a time. Without it the rows are read as stored, the past in one call.
    """
    if not applies(q, info) or (decode is None and keys.dtype != q.dtype):
        return None
    t = own_keys(q_pos, k_pos)
    if t is None:
        return None
    read = decode or (lambda rows: rows)
    s = keys.shape[2]
    out, lse = flash(q, read(keys[:, :, s - t :]), read(values[:, :, s - t :]), info, causal=True)
    step = DECODED_PAST_KEYS if decode is not None else max(s - t, 1)
    for start in range(0, s - t, step):
        end = min(s - t, start + step)
        past = flash(q, read(keys[:, :, start:end]), read(values[:, :, start:end]), info, causal=False)
        out, lse = merge(*past, out, lse)
    return out
