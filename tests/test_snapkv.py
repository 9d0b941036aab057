"""SnapKV selects what a plain reference computation selects, stores KV heads only, and keeps positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import VOCAB
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.errors import TiermemError
from tiermem.memory import SnapKV
from tiermem.memory.snapkv import SnapKVLayer, select_tokens, snapkv_scores


def reference_indices(queries: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int, keep: int, pooling: str):
    """SnapKV as the reference code writes it (repeat_kv, summed votes, pooling), plus kvpress's GQA group mean."""
    _, hq, w, _ = queries.shape
    _, hkv, s, _ = keys.shape
    group = hq // hkv
    expanded = keys.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", queries, expanded) * scaling
    for i in range(w):
        logits[:, :, i, s - w + i + 1 :] = float("-inf")
    votes = logits.softmax(dim=-1)[..., : s - w].sum(dim=-2)  # (1, Hq, S - w)
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(votes, kernel_size=kernel, padding=kernel // 2, stride=1)
    per_kv_head = pooled.view(1, hkv, group, s - w).mean(dim=2)[0]
    return per_kv_head.topk(keep, dim=-1).indices.sort(dim=-1).values


def prefilled(model: torch.nn.Module, policy: SnapKV, n: int, chunk: int) -> TierCache:
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(4))
    cache = TierCache(model, policy)
    cache.plan(n, n + 4)
    with torch.no_grad(), patched_attention(model):
        for start in range(0, n, chunk):
            part = ids[:, start : start + chunk]
            model(input_ids=part, position_ids=torch.arange(start, start + part.shape[1])[None], cache=cache)
    return cache


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_kept_indices_equal_reference(llama: torch.nn.Module, pooling: str) -> None:
    policy = SnapKV(kv_budget=24, window_size=8, kernel_size=5, pooling=pooling)
    cache = prefilled(llama, policy, n=60, chunk=13)  # the window straddles two chunks
    for layer in cache.tier_layers:
        assert isinstance(layer, SnapKVLayer)
        keys_before = layer.buffer.view()[0].clone()
        assert layer.window_queries is not None
        expected = reference_indices(layer.window_queries, keys_before, layer.info.scaling, 5, 24 - 8, pooling)
        layer.end_context()
        positions = layer.buffer.view()[2]
        window = torch.arange(52, 60).expand(2, 8)
        assert torch.equal(positions, torch.cat([expected, window], dim=1))


def test_storage_keeps_kv_heads_and_original_positions(llama: torch.nn.Module) -> None:
    policy = SnapKV(kv_budget=20, window_size=4)
    cache = prefilled(llama, policy, n=50, chunk=50)
    before = [layer.buffer.view()[0].clone() for layer in cache.tier_layers]
    cache.end_context()
    for layer, keys_before in zip(cache.tier_layers, before, strict=True):
        keys, values, positions = layer.buffer.view()
        assert keys.shape == (1, llama.config.num_key_value_heads, 20, layer.info.head_dim)
        assert values.shape == keys.shape
        # Kept keys are exactly the keys rotated at their original positions: nothing was re-rotated or shifted.
        expected = keys_before[0].gather(1, positions[:, :, None].expand(-1, -1, keys.shape[-1]))
        assert torch.equal(keys[0], expected)
        assert layer.seen == 50  # the next token is at position 50, not 20
        assert layer.kv_bytes() < keys_before.numel() * 4 * 2  # the block was shrunk, memory given back


def test_heads_may_keep_different_tokens(llama: torch.nn.Module) -> None:
    cache = prefilled(llama, SnapKV(kv_budget=12, window_size=4), n=80, chunk=80)
    cache.end_context()
    assert any(not torch.equal(layer.buffer.positions[0], layer.buffer.positions[1]) for layer in cache.tier_layers)


def test_prompt_within_budget_is_untouched(llama: torch.nn.Module) -> None:
    cache = prefilled(llama, SnapKV(kv_budget=64, window_size=8), n=40, chunk=40)
    cache.end_context()
    assert all(torch.equal(layer.buffer.view()[2][0], torch.arange(40)) for layer in cache.tier_layers)


def test_compression_ratio_follows_kvpress_rounding(llama: torch.nn.Module) -> None:
    cache = prefilled(llama, SnapKV(compression_ratio=0.75, window_size=4), n=50, chunk=50)
    cache.end_context()
    assert cache.kv_tokens() == int(50 * 0.25)


def test_chunk_selection_keeps_whole_chunks() -> None:
    scores = torch.zeros(1, 2, 40)
    scores[0, 0, 17] = 5.0  # best token of chunk 2 (tokens 16..23) for head 0
    scores[0, 1, 33] = 5.0  # chunk 4 (32..39) for head 1
    picked = select_tokens(scores, keep=8, selection="chunk", chunk_size=8)
    assert torch.equal(picked[0], torch.arange(16, 24))
    assert torch.equal(picked[1], torch.arange(32, 40))


def test_scores_shape_and_window_causality() -> None:
    queries = torch.randn(1, 4, 6, 8)
    keys = torch.randn(1, 2, 30, 8)
    scores = snapkv_scores(queries, keys, 8**-0.5, 5, "avgpool")
    assert scores.shape == (1, 2, 24)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"kv_budget": 16}, {"kv_budget": 512, "pooling": "median"}, {}, {"kv_budget": 8, "compression_ratio": 0.5}],
)
def test_bad_settings_are_rejected(kwargs: dict) -> None:
    with pytest.raises(TiermemError):
        SnapKV(**kwargs)
