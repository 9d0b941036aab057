"""Batched decoding across sessions: one forward for rows that each carry their own TierCache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny
from tests.test_serve_sessions import SMALL
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import forward, prefill
from tiermem.memory import registry
from tiermem.models import LoadedModel
from tiermem.serve.batch import decode_step

POLICIES = ["full", "streaming", "snapkv", "infllm", "emllm-small"]


def _caches(model: torch.nn.Module, name: str, prompts: list[torch.Tensor]) -> tuple[list[TierCache], list[int]]:
    policy = registry.build(name, **SMALL.get(name, {}))
    caches, firsts = [], []
    for prompt in prompts:
        cache = TierCache(model, policy)  # type: ignore[arg-type]
        cache.plan(prompt.shape[1], prompt.shape[1] + 16)
        logits = prefill(model, cache, prompt, 16)  # type: ignore[arg-type]
        cache.end_context()
        assert logits is not None
        caches.append(cache)
        firsts.append(int(logits.argmax()))
    return caches, firsts


@pytest.mark.parametrize(
    ("arch", "name"), [*(("llama", p) for p in POLICIES), ("gemma3", "full"), ("gemma3", "infllm")]
)
def test_batched_steps_equal_one_row_at_a_time(arch: str, name: str) -> None:
    """Rows of different lengths, each under its own cache: greedy tokens equal the unbatched run's, logits close."""
    model = tiny(arch)
    lm = LoadedModel(name=arch, model=model, tokenizer=None, source=Path("."))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (1, n), generator=gen) for n in (70, 33, 101)]
    with torch.inference_mode(), patched_attention(model):
        batched, tokens = _caches(model, name, prompts)
        alone, alone_tokens = _caches(model, name, prompts)
        assert tokens == alone_tokens
        for _ in range(8):
            rows = decode_step(lm, batched, tokens)  # (3, vocab); float32: the model's batched forward
            single = torch.stack([forward(model, c, torch.tensor([[t]])) for c, t in zip(alone, tokens, strict=True)])
            torch.testing.assert_close(rows, single, rtol=1e-4, atol=1e-4)
            tokens = rows.argmax(dim=-1).tolist()
            assert tokens == single.argmax(dim=-1).tolist()
        assert [c.get_seq_length() for c in batched] == [p.shape[1] + 8 for p in prompts]


def test_a_batch_needs_one_cache_per_row() -> None:
    model = tiny("llama")
    cache = TierCache(model, registry.build("full"))
    with torch.inference_mode(), patched_attention(model), pytest.raises(ValueError, match="one TierCache per"):
        model(input_ids=torch.zeros(2, 3, dtype=torch.long), cache=cache, use_cache=True)
