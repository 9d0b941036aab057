"""Policies under the context manager (plain ``generate``) and with other allocators leave the outputs unchanged.

The covering-budget check over every registered policy is tests/test_policy_matrix.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ARCHITECTURES, VOCAB, tiny
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.memory import Full, Policy, SnapKV


def chunked_logits(model: torch.nn.Module, policy: Policy, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits of every position, fed through a TierCache ``chunk`` tokens at a time."""
    cache = TierCache(model, policy)
    cache.plan(ids.shape[1], ids.shape[1])
    outs = []
    with torch.no_grad(), patched_attention(model):
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start : start + chunk]
            positions = torch.arange(start, start + part.shape[1]).unsqueeze(0)
            outs.append(model(input_ids=part, position_ids=positions, cache=cache, use_cache=True).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_context_manager_works_with_plain_generate(arch: str) -> None:
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=12, do_sample=False)
        with SnapKV(kv_budget=4096)(model):
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, reference)


def test_context_manager_restores_the_model(llama: torch.nn.Module) -> None:
    implementation = llama.config._attn_implementation
    with Full()(llama):
        assert llama.config._attn_implementation == "tiermem"
        assert all("forward" in vars(layer.self_attn) for layer in llama.model.layers)
    assert llama.config._attn_implementation == implementation
    assert not any("forward" in vars(layer.self_attn) for layer in llama.model.layers)


def test_context_manager_restores_the_model_after_an_error(llama: torch.nn.Module) -> None:
    with pytest.raises(RuntimeError, match="boom"), Full()(llama):
        raise RuntimeError("boom")
    assert not any("forward" in vars(layer.self_attn) for layer in llama.model.layers)


def test_compression_under_generate_changes_the_cache(llama: torch.nn.Module) -> None:
    """Under the context manager, generate()'s prefill forward is compressed right after it runs."""
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), SnapKV(kv_budget=40, window_size=8)(llama):
        out = llama.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    layers = out.past_key_values.layers
    assert all(layer.kv_tokens() == 40 + 4 for layer in layers)  # 40 kept, then 4 decode steps appended
    assert all(layer.seen == 64 for layer in layers)


@pytest.mark.parametrize("allocator", ["paged", "concat"])
def test_allocators_give_the_same_logits(llama: torch.nn.Module, allocator: str) -> None:
    from tiermem.kvstore.blocks import StoreConfig

    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    reference = chunked_logits(llama, Full(), ids, 8)
    cache = TierCache(llama, SnapKV(kv_budget=4096), StoreConfig(allocator=allocator))
    cache.plan(40, 40)
    outs = []
    with torch.no_grad(), patched_attention(llama):
        for start in range(0, 40, 8):
            positions = torch.arange(start, start + 8).unsqueeze(0)
            outs.append(llama(input_ids=ids[:, start : start + 8], position_ids=positions, cache=cache).logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), reference)
