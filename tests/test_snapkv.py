"""SnapKV selects what a plain reference computation selects, stores KV heads only, and keeps positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import VOCAB
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import GenerationConfig, generate
from tiermem.errors import TiermemError
from tiermem.memory import SnapKV
from tiermem.memory.registry import build
from tiermem.memory.snapkv import SnapKVLayer, select_tokens, select_units, sentence_units, snapkv_scores
from tiermem.models import load
from tiermem.prompts import build_prompt


def reference_indices(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    kernel: int,
    keep: int,
    pooling: str,
    vote: str = "sum",
    shared: bool = False,
):
    """SnapKV as the reference code writes it (repeat_kv, summed votes, pooling), plus kvpress's GQA group mean.

    ``vote="max"``: the most attention from any one window query instead of the sum; ``shared``: one selection from
    the scores averaged over KV heads, repeated for each head."""
    _, hq, w, _ = queries.shape
    _, hkv, s, _ = keys.shape
    group = hq // hkv
    expanded = keys.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", queries, expanded) * scaling
    for i in range(w):
        logits[:, :, i, s - w + i + 1 :] = float("-inf")
    probs = logits.softmax(dim=-1)[..., : s - w]
    votes = probs.sum(dim=-2) if vote == "sum" else probs.max(dim=-2).values  # (1, Hq, S - w)
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(votes, kernel_size=kernel, padding=kernel // 2, stride=1)
    per_kv_head = pooled.view(1, hkv, group, s - w).mean(dim=2)[0]
    if shared:
        return per_kv_head.mean(dim=0).topk(keep).indices.sort().values.expand(hkv, keep)
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
    [
        {"kv_budget": 16},
        {"kv_budget": 512, "pooling": "median"},
        {},
        {"kv_budget": 8, "compression_ratio": 0.5},
        {"kv_budget": 512, "vote": "sum"},
        {"kv_budget": 512, "selection": "sentences"},
    ],
)
def test_bad_settings_are_rejected(kwargs: dict) -> None:
    with pytest.raises(TiermemError):
        SnapKV(**kwargs)


@pytest.mark.parametrize("shared", [False, True])
def test_max_vote_and_shared_heads_equal_reference(llama: torch.nn.Module, shared: bool) -> None:
    policy = SnapKV(kv_budget=24, window_size=8, kernel_size=3, pooling="maxpool", vote="max", shared_heads=shared)
    cache = prefilled(llama, policy, n=60, chunk=13)
    for layer in cache.tier_layers:
        assert isinstance(layer, SnapKVLayer) and layer.window_queries is not None
        keys = layer.buffer.view()[0].clone()
        expected = reference_indices(layer.window_queries, keys, layer.info.scaling, 3, 16, "maxpool", "max", shared)
        mean_vote = reference_indices(layer.window_queries, keys, layer.info.scaling, 3, 16, "maxpool", "sum", shared)
        layer.end_context()
        positions = layer.buffer.view()[2]
        assert positions.shape[0] == llama.config.num_key_value_heads
        assert torch.equal(positions, torch.cat([expected, torch.arange(52, 60).expand(2, 8)], dim=1))
        if shared:
            assert torch.equal(positions[0], positions[1])  # every KV head keeps the same tokens
    assert not torch.equal(expected, mean_vote)  # the max vote is not the sum's ranking in disguise


def test_sentence_units_cover_the_prefix_and_cut_only_long_sentences() -> None:
    assert sentence_units([3, 9, 30], 40, 8).tolist() == [4, 6, 8, 8, 5, 8, 1]
    assert int(sentence_units([], 20, 8).sum()) == 20  # no text: plain chunks


def test_sentence_selection_keeps_whole_sentences() -> None:
    generator = torch.Generator().manual_seed(3)
    sizes = torch.tensor([5, 7, 3, 6, 4, 8, 2, 5])  # sentences of 40 tokens, all shorter than chunk_size
    scores = torch.rand(1, 2, 40, generator=generator)
    picked = select_units(scores, keep=14, sizes=sizes)
    starts = (sizes.cumsum(0) - sizes).tolist()
    for head in range(2):
        kept = set(picked[head].tolist())
        # Reference: sentences by their best token, best first, each taken whole while it fits, then best tokens.
        best = [float(scores[0, head, a : a + n].max()) for a, n in zip(starts, sizes.tolist(), strict=True)]
        whole: set[int] = set()
        for unit in sorted(range(len(best)), key=lambda u: -best[u]):
            if len(whole) + int(sizes[unit]) <= 14:
                whole |= set(range(starts[unit], starts[unit] + int(sizes[unit])))
        rest = [i for i in scores[0, head].argsort(descending=True).tolist() if i not in whole]
        assert kept == whole | set(rest[: 14 - len(whole)])
        assert len(whole) >= 11  # whole sentences fill most of the budget


def test_sentence_policy_reads_token_text_and_never_cuts_a_sentence(llama: torch.nn.Module) -> None:
    policy = build("snapkv-sentence", kv_budget=30, window_size=4, chunk_size=16)
    assert policy.needs_token_text
    ids = torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(5))
    cache = TierCache(llama, policy)
    cache.plan(96, 100)
    cache.observe_tokens(0, ["." if i % 6 == 5 else "w" for i in range(96)])  # a sentence every 6 tokens
    with torch.no_grad(), patched_attention(llama):
        llama(input_ids=ids, cache=cache, position_ids=torch.arange(96)[None])
        cache.end_context()
    for layer in cache.tier_layers:
        kept = layer.buffer.view()[2]
        assert kept.shape == (llama.config.num_key_value_heads, 30) and torch.equal(kept[0], kept[1])
        prefix = set(kept[0, :-4].tolist())
        sentences = [set(range(a, a + 6)) for a in range(0, 92, 6)]
        whole = [s for s in sentences if s <= prefix]
        assert len(whole) == 26 // 6  # four whole 6-token sentences, then the 2 best tokens left
        assert len(prefix - set().union(*whole)) == 2


def test_budget_includes_new_tokens_bounds_kv_while_decoding(tiny_model_dir) -> None:
    lm = load(str(tiny_model_dir))
    prompt = build_prompt(lm, "The pass key is 4321. Remember it. " * 30, "What is the pass key?")
    n = prompt.num_tokens
    config = GenerationConfig(max_new_tokens=6, stop_on_eos=False, question_aware=True)
    for spec in ("snapkv", "snapkv-chunk", "snapkv-sentence"):
        folded = build(spec, compression_ratio=0.875, window_size=4, budget_includes_new=True)
        plain = build(spec, compression_ratio=0.875, window_size=4)
        kept = generate(lm, prompt, folded, config).stats
        assert kept.kv_tokens == int(n * 0.125) - 6  # the 6 new tokens are counted in the budget
        assert generate(lm, prompt, plain, config).stats.kv_tokens == int(n * 0.125)
        full = generate(lm, prompt, build("full"), config).stats
        assert kept.kv_bytes_decode <= full.kv_bytes_decode * 0.125


def test_budget_too_small_for_window_plus_new_tokens_is_refused() -> None:
    policy = SnapKV(kv_budget=40, window_size=32, budget_includes_new=True)
    policy.check(1000, 1007, 8192)  # 40 - 7 > 32: fine
    with pytest.raises(TiermemError, match="observation window plus"):
        policy.check(1000, 1016, 8192)
