"""Every registered policy on every tiny architecture: registering a policy is what gets it tested here.

A budget that covers the whole sequence must give the unmodified model's logits, through chunked prefill, the
policy's compression and decoding. A budget below the context must really bound the tokens each layer holds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import ARCHITECTURES, VOCAB, tiny
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import GenerationConfig, forward, surprise
from tiermem.kvstore.blocks import StoreConfig
from tiermem.layer_info import describe_layers
from tiermem.memory import REGISTRY, BudgetedPolicy, Policy, SentenceKV, build
from tiermem.memory.auto import Auto
from tiermem.memory.context_memory import ContextMemoryPolicy

# Options that make a policy of a kind hold everything for a sequence of a few hundred tokens. Matched by base
# class, first match wins; a policy of a new kind falls back to its registered defaults.
COVERING_OPTIONS: list[tuple[type[Policy], dict[str, Any]]] = [
    (BudgetedPolicy, {"kv_budget": 4096}),
    # A window covering the sequence leaves no block to retrieve, so "heads" retrieval (which calibrates with a
    # tokenizer these tiny models lack) has nothing to pick: tests/test_retrieval_heads.py covers it.
    (ContextMemoryPolicy, {"n_local": 4096, "retrieval": "mean"}),
    (SentenceKV, {"token_budget": 4096}),
]


def covering(name: str, model: torch.nn.Module, context: int, total: int) -> Policy:
    cls = REGISTRY[name].cls
    options = next((opts for base, opts in COVERING_OPTIONS if issubclass(cls, base)), {})
    policy = build(name, **options)
    if isinstance(policy, Auto):  # auto picks the policy that runs once the length is known
        return policy.choose(describe_layers(model), context, total, GenerationConfig()).policy
    return policy


def pieces(start: int, count: int) -> list[str]:
    """Stand-in token text for policies that read it: a sentence ends every 10 tokens."""
    return ["." if (start + i) % 10 == 9 else "w" for i in range(count)]


def run(
    model: torch.nn.Module,
    policy: Policy,
    ids: torch.Tensor,
    context: int,
    chunk: int,
    store: StoreConfig | None = None,
) -> tuple[Any, Any]:
    """Engine-like run with teacher forcing: prefill ``ids[:, :context]`` in chunks, ``end_context``, then decode
    the remaining ids one at a time. Returns the logits of every position (T, vocab) and the cache after the context
    was compressed, as seen by the decode steps (``kv_tokens`` per layer right after ``end_context``). ``store``
    sets the KV format and block store (default: float KV in RAM)."""
    cache = TierCache(model, policy, store)
    cache.plan(context, ids.shape[1])
    outs: list[torch.Tensor] = []
    previous: torch.Tensor | None = None

    def step(part: torch.Tensor) -> None:
        nonlocal previous
        if policy.needs_token_text:
            cache.observe_tokens(cache.get_seq_length(), pieces(cache.get_seq_length(), part.shape[1]))
        logits = forward(model, cache, part, every_position=True)
        if policy.needs_surprise:
            cache.observe_surprise(surprise(previous, logits, part[0]))
        previous = logits[-1]
        outs.append(logits)

    with torch.no_grad(), patched_attention(model):
        for part in ids[:, :context].split(chunk, dim=1):
            step(part)
        cache.end_context()
        after_context = [layer.kv_tokens() for layer in cache.tier_layers]
        for i in range(context, ids.shape[1]):
            step(ids[:, i : i + 1])
    return torch.cat(outs), (cache, after_context)


CASES = [pytest.param(name, arch) for name in REGISTRY for arch in ARCHITECTURES]


@pytest.mark.parametrize(("name", "arch"), CASES)
def test_covering_budget_gives_unmodified_logits(arch: str, name: str) -> None:
    model = tiny(arch)
    policy = covering(name, model, 45, 50)
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits[0]
    for chunk in (45, 7):
        got, _ = run(model, policy, ids, 45, chunk)
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-4)


BUDGETED = [name for name, entry in REGISTRY.items() if issubclass(entry.cls, BudgetedPolicy)]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("name", BUDGETED)
def test_budget_bounds_what_global_layers_hold(arch: str, name: str) -> None:
    model = tiny(arch)
    budget = build(name, kv_budget=4096).fixed_tokens() + 24
    context, new = 2 * budget + 40, 4
    policy = build(name, kv_budget=budget)
    ids = torch.randint(0, VOCAB, (1, context + new), generator=torch.Generator().manual_seed(2))
    _, (cache, after_context) = run(model, policy, ids, context, 50)
    global_layers = [i for i, layer in enumerate(cache.tier_layers) if not layer.is_sliding]
    if not global_layers:  # Mistral: every layer is local, which no policy compresses
        return
    held = [after_context[i] for i in global_layers]
    # Layers may split the budget unevenly (PyramidKV), never beyond the uniform total.
    assert sum(held) <= budget * len(held)
    assert max(held) < context
    decoded = [cache.tier_layers[i].kv_tokens() for i in global_layers]
    assert sum(decoded) <= (budget + new) * len(held)
    per_token = sum(cache.infos[i].kv_bytes_per_token() for i in global_layers)
    global_bytes = sum(cache.tier_layers[i].kv_bytes() for i in global_layers)
    assert global_bytes < per_token * (context + new)  # memory is really given back
