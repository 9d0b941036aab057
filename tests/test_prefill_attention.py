"""The causal prefill fast path equals the masked attention it replaces, and steps aside where it does not apply."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tiermem.kvstore.quant import kv_format
from tiermem.kvstore.quant_attention import int8_attention
from tiermem.layer_info import LayerInfo
from tiermem.memory import layer as layer_module
from tiermem.prefill_attention import causal_prefill, own_keys

HQ, HKV, D = 6, 2, 16


def info(dtype: torch.dtype = torch.float32, sliding_window: int | None = None) -> LayerInfo:
    return LayerInfo(0, HQ, HKV, D, D**-0.5, sliding_window, None, mock.Mock(), 4096, dtype)


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The reference: one SDPA call with the (T, S) causal mask."""
    visible = k_pos[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=D**-0.5, enable_gqa=True)


def tensors(t: int, s: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(s * 31 + t)
    q = torch.randn(1, HQ, t, D, generator=g).to(dtype)
    k = torch.randn(1, HKV, s, D, generator=g).to(dtype)
    v = torch.randn(1, HKV, s, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize(("t", "s"), [(5, 5), (7, 40), (64, 300)])
def test_fast_path_equals_the_masked_call(t: int, s: int) -> None:
    q, k, v = tensors(t, s)
    q_pos, k_pos = torch.arange(s - t, s), torch.arange(s)
    fast = causal_prefill(q, k, v, q_pos, k_pos, info())
    assert fast is not None
    torch.testing.assert_close(fast, masked(q, k, v, q_pos, k_pos), atol=2e-6, rtol=1e-5)


def test_fast_path_in_bfloat16_is_close() -> None:
    q, k, v = tensors(16, 100, torch.bfloat16)
    q_pos, k_pos = torch.arange(84, 100), torch.arange(100)
    fast = causal_prefill(q, k, v, q_pos, k_pos, info(torch.bfloat16))
    assert fast is not None and fast.dtype == torch.bfloat16
    ref = masked(q.float(), k.float(), v.float(), q_pos, k_pos)
    torch.testing.assert_close(fast.float(), ref, atol=3e-2, rtol=3e-2)


def test_compressed_past_with_gaps_still_takes_the_path() -> None:
    """SnapKV-style kept tokens: the past's positions have holes, all before the chunk."""
    q, k, v = tensors(8, 30)
    k_pos = torch.cat([torch.arange(0, 44, 2), torch.arange(50, 58)])  # 22 kept + 8 own
    q_pos = torch.arange(50, 58)
    fast = causal_prefill(q, k, v, q_pos, k_pos, info())
    assert fast is not None
    torch.testing.assert_close(fast, masked(q, k, v, q_pos, k_pos), atol=2e-6, rtol=1e-5)


def test_other_layouts_step_aside() -> None:
    q_pos = torch.arange(10, 14)
    assert own_keys(q_pos[:1], torch.arange(11)) is None  # a decode step
    assert own_keys(q_pos, torch.cat([torch.arange(10), torch.tensor([13, 12, 11, 10])])) is None  # not the chunk
    assert own_keys(q_pos, torch.cat([torch.tensor([20]), torch.arange(10, 14)])) is None  # a key after the chunk
    assert own_keys(q_pos, torch.arange(14)) == 4
    q, k, v = tensors(4, 14)
    assert causal_prefill(q, k, v, q_pos, torch.arange(14), info(sliding_window=8)) is None


def test_attention_uses_the_path_and_keeps_its_result() -> None:
    q, k, v = tensors(12, 60)
    q_pos, k_pos = torch.arange(48, 60), torch.arange(60)
    with mock.patch.object(layer_module, "causal_prefill", wraps=causal_prefill) as spy:
        out = layer_module.attention(q, k, v, q_pos, k_pos, info())
    assert spy.call_count == 1
    torch.testing.assert_close(out, masked(q, k, v, q_pos, k_pos), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("s", [12, 70])
def test_int8_prefill_equals_the_online_loop(s: int) -> None:
    """int8 rows: the decoded-flash route gives the online-softmax loop's answer (same int8 rows, same math)."""
    fmt = kv_format("int8", torch.float32)
    q, k, v = tensors(12, s)
    keys, values = fmt.encode(k), fmt.encode(v)
    q_pos, k_pos = torch.arange(s - 12, s), torch.arange(s)
    fast = int8_attention(q, keys, values, fmt, q_pos, k_pos, info())
    with mock.patch("tiermem.kvstore.quant_attention.causal_prefill", return_value=None):
        loop = int8_attention(q, keys, values, fmt, q_pos, k_pos, info())
    torch.testing.assert_close(fast, loop, atol=2e-5, rtol=1e-4)
    decoded = masked(q, fmt.decode(keys, torch.float32), fmt.decode(values, torch.float32), q_pos, k_pos)
    torch.testing.assert_close(fast, decoded, atol=2e-5, rtol=1e-4)


def test_int8_past_read_in_several_pieces_is_the_same() -> None:
    """The decoded past is read DECODED_PAST_KEYS keys at a time; pieces merge into one softmax."""
    fmt = kv_format("int8", torch.float32)
    q, k, v = tensors(12, 70)
    keys, values = fmt.encode(k), fmt.encode(v)
    q_pos, k_pos = torch.arange(58, 70), torch.arange(70)
    whole = int8_attention(q, keys, values, fmt, q_pos, k_pos, info())
    with mock.patch("tiermem.prefill_attention.DECODED_PAST_KEYS", 16):
        pieces = int8_attention(q, keys, values, fmt, q_pos, k_pos, info())
    torch.testing.assert_close(pieces, whole, atol=2e-6, rtol=1e-5)
