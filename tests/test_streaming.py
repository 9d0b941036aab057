"""StreamingLLM keeps exactly the sinks plus the most recent tokens, during prefill and decoding."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import VOCAB
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.errors import TiermemError
from tiermem.memory import DenseLayer, StreamingLLM
from tiermem.memory.layer import attention
from tiermem.memory.streaming import StreamingLayer
from tiermem.rope import apply_rope


def run(model: torch.nn.Module, policy: StreamingLLM, n: int, chunk: int, decode: int) -> TierCache:
    ids = torch.randint(0, VOCAB, (1, n + decode), generator=torch.Generator().manual_seed(5))
    cache = TierCache(model, policy)
    cache.plan(n, n + decode)
    with torch.no_grad(), patched_attention(model):
        for start in range(0, n, chunk):
            part = ids[:, start : min(start + chunk, n)]
            model(input_ids=part, cache=cache, position_ids=torch.arange(start, start + part.shape[1])[None])
        cache.end_context()
        for step in range(n, n + decode):
            model(input_ids=ids[:, step : step + 1], cache=cache, position_ids=torch.tensor([[step]]))
    return cache


def visible_positions(layer: StreamingLayer) -> torch.Tensor:
    positions = layer.buffer.view()[2][0]
    return positions[(positions < layer.policy.n_sink) | (positions >= layer.window_start)]


@pytest.mark.parametrize("rerotate", [True, False])
def test_keeps_sinks_plus_recent(llama: torch.nn.Module, rerotate: bool) -> None:
    cache = run(llama, StreamingLLM(kv_budget=12, n_sink=4, rerotate=rerotate), n=40, chunk=5, decode=3)
    expected = torch.cat([torch.arange(4), torch.arange(43 - 8, 43)])
    for layer in cache.tier_layers:
        assert isinstance(layer, StreamingLayer)
        assert torch.equal(visible_positions(layer), expected)
        assert layer.kv_tokens() == 12
        assert layer.buffer.length <= 12 + StreamingLayer.slack + 1  # evicted tokens are dropped in batches
        assert layer.seen == 43


class SlotStreamingLayer(DenseLayer):
    """The paper's rule written plainly: keys before RoPE, rotated at their cache slot on each read, evicted at once."""

    def __init__(self, info, policy: StreamingLLM):
        super().__init__(info)
        self.policy = policy

    def attend(self, q, k, v):
        t, old = q.shape[2], self.buffer.length
        self.buffer.append(k, v, torch.arange(self.seen, self.seen + t))
        self.seen += t
        keys, values, _ = self.buffer.view()
        slots = torch.arange(keys.shape[2])
        cos, sin = self.info.rope.cos_sin_range(0, keys.shape[2])
        out = attention(
            apply_rope(q, cos[old:], sin[old:]), apply_rope(keys, cos, sin), values, slots[old:], slots, self.info
        )
        n, budget, sinks = self.buffer.length, self.policy.kv_budget, self.policy.n_sink
        if n > budget:
            self.buffer.keep(torch.cat([torch.arange(sinks), torch.arange(n - (budget - sinks), n)]))
        return out


class SlotStreaming(StreamingLLM):
    def make_global_layer(self, info):
        return SlotStreamingLayer(info, self)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_rerotation_matches_the_plain_cache_slot_rule(llama: torch.nn.Module, chunk: int) -> None:
    ids = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(11))
    outputs = []
    for policy in (StreamingLLM(kv_budget=20, n_sink=4), SlotStreaming(kv_budget=20, n_sink=4)):
        cache = TierCache(llama, policy)
        cache.plan(150, 150)
        logits = []
        with torch.no_grad(), patched_attention(llama):
            for start in range(0, 150, chunk):
                part = ids[:, start : start + chunk]
                positions = torch.arange(start, start + part.shape[1])[None]
                logits.append(llama(input_ids=part, cache=cache, position_ids=positions).logits)
        outputs.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def test_memory_stays_bounded_whatever_the_length(llama: torch.nn.Module) -> None:
    short = run(llama, StreamingLLM(kv_budget=16), n=600, chunk=50, decode=2)
    long = run(llama, StreamingLLM(kv_budget=16), n=1500, chunk=50, decode=2)  # past the model's 512 positions
    assert long.kv_bytes() == short.kv_bytes()
    assert long.kv_bytes_peak() == short.kv_bytes_peak()


def test_rerotation_fits_any_length() -> None:
    assert StreamingLLM(kv_budget=64).fits_any_length
    assert not StreamingLLM(kv_budget=64, rerotate=False).fits_any_length
    StreamingLLM(kv_budget=64).check(context_tokens=100_000, total_tokens=100_032, max_positions=8192)
    with pytest.raises(TiermemError, match="positions"):
        StreamingLLM(kv_budget=64, rerotate=False).check(100_000, 100_032, 8192)


@pytest.mark.parametrize("budget", [0, 3, 4])
def test_budget_must_exceed_the_sinks(budget: int) -> None:
    with pytest.raises(TiermemError, match="too small"):
        StreamingLLM(kv_budget=budget)


def test_kvpress_style_eviction_after_the_whole_prefill(llama: torch.nn.Module) -> None:
    policy = StreamingLLM(kv_budget=12, n_sink=4, evict_during_prefill=False)
    assert not policy.fits_any_length  # the whole context is attended at its original positions first
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = TierCache(llama, policy)
    cache.plan(40, 40)
    with torch.no_grad(), patched_attention(llama):
        for start in range(0, 40, 10):
            llama(input_ids=ids[:, start : start + 10], cache=cache, position_ids=torch.arange(start, start + 10)[None])
        assert cache.kv_tokens() == 40
        cache.end_context()
    assert all(
        torch.equal(visible_positions(layer), torch.cat([torch.arange(4), torch.arange(32, 40)]))
        for layer in cache.tier_layers
    )


def test_memory_bound_follows_the_chunk_size(llama: torch.nn.Module) -> None:
    """A prefill chunk larger than 512 tokens is held whole before eviction: the reservation and the
    ``--kv-memory`` bound must use the chunk size in force (they assumed 512)."""
    policy, n, chunk = StreamingLLM(kv_budget=12, n_sink=4), 1400, 700
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(5))
    cache = TierCache(llama, policy)
    cache.plan(n, n, chunk)
    with torch.no_grad(), patched_attention(llama):
        for start in range(0, n, chunk):
            part = ids[:, start : start + chunk]
            llama(input_ids=part, cache=cache, position_ids=torch.arange(start, start + part.shape[1])[None])
    info = cache.tier_layers[0].info
    for layer in cache.tier_layers:
        assert isinstance(layer, StreamingLayer)
        assert layer.buffer.reallocations == 1  # the reservation only: the whole chunk was reserved up front
        held = layer.buffer.capacity  # slots allocated: the most tokens the layer could hold at once
        assert policy.peak_tokens(info, n, n, 512) < held <= policy.peak_tokens(info, n, n, chunk)
