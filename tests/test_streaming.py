"""StreamingLLM keeps exactly the sinks plus the most recent tokens, during prefill and decoding."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import VOCAB
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.errors import TiermemError
from tiermem.memory import StreamingLLM


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


@pytest.mark.parametrize("rerotate", [True, False])
def test_keeps_sinks_plus_recent(llama: torch.nn.Module, rerotate: bool) -> None:
    cache = run(llama, StreamingLLM(kv_budget=12, n_sink=4, rerotate=rerotate), n=40, chunk=5, decode=3)
    expected = torch.cat([torch.arange(4), torch.arange(43 - 8, 43)])
    for layer in cache.tier_layers:
        positions = layer.buffer.view()[2]
        assert positions.shape == (llama.config.num_key_value_heads, 12)
        assert all(torch.equal(row, expected) for row in positions)
        assert layer.seen == 43


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
