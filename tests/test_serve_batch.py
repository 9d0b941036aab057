"""Batched decoding across sessions: one forward for rows that each carry their own TierCache."""

from __future__ import annotations

import copy
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
from tiermem.native import decode_extension
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


def test_the_fused_step_runs_a_batch_only_when_every_row_allows_it() -> None:
    """With the model's fused step, a batch of full caches takes it; one streaming row sends the whole batch to the
    model's forward, whose rows equal each row's own Python step."""
    from tests.test_decode_step import _lm, _prefilled
    from tiermem.decode_step import fused_decoder
    from tiermem.engine import forward_token

    if decode_extension()[0] is None:
        pytest.skip(decode_extension()[1])
    lm = _lm()
    fused, why = fused_decoder(lm, [])
    assert fused is not None, why
    full, other = _prefilled(lm, "int8"), _prefilled(lm, "int8", policy="streaming")
    with torch.inference_mode(), patched_attention(lm.model):
        twin = copy.deepcopy(full)
        assert torch.equal(decode_step(lm, [full], [5], fused), fused.step([twin], [5]))  # fused: the same bits
        mixed = [copy.deepcopy(full), copy.deepcopy(other)]
        rows = decode_step(lm, mixed, [7, 9], fused)
        single = torch.stack([forward_token(lm.model, c, t) for c, t in zip([full, other], [7, 9], strict=True)])
        torch.testing.assert_close(rows, single, rtol=1e-2, atol=1e-2)


def test_off_main_thread_returns_and_raises() -> None:
    import threading

    from tiermem.serve.cli import off_main_thread

    assert off_main_thread(lambda x: (x, threading.current_thread() is threading.main_thread()), 3) == (3, False)
    with pytest.raises(KeyError, match="gone"):
        off_main_thread(lambda: {}["gone"])
