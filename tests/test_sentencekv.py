"""SentenceKV: sentence ends from decoded text, sentences offloaded with one vector each, retrieval per step."""

from __future__ import annotations

import torch

from tests.conftest import VOCAB
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import GenerationConfig, generate
from tiermem.memory import SentenceKV
from tiermem.memory.sentencekv import SentenceKVLayer
from tiermem.memory.sentences import ends_sentence, sentence_spans
from tiermem.models import load
from tiermem.prompts import build_prompt


def test_sentence_ends_from_decoded_pieces() -> None:
    assert ends_sentence(".") and ends_sentence(". ") and ends_sentence('."') and ends_sentence("?)")
    assert ends_sentence("\n\n") and ends_sentence("ok.\n\nThe") and ends_sentence("。")
    assert not ends_sentence(" Mr") and not ends_sentence("3.5x") and not ends_sentence("\n")
    assert sentence_spans([3, 7, 20], 2, 12) == [(2, 4), (4, 8), (8, 12)]


def test_sentences_are_offloaded_and_retrieved(llama: torch.nn.Module) -> None:
    policy = SentenceKV(
        token_budget=24, semantic_factor=2, window_size=4, kernel_size=3, start_budget=4, recent_budget=4
    )
    ids = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(9))
    cache = TierCache(llama, policy)
    cache.plan(120, 130)
    cache.observe_tokens(0, ["." if i % 10 == 9 else "w" for i in range(120)])  # a sentence every 10 tokens
    with torch.no_grad(), patched_attention(llama):
        llama(input_ids=ids, cache=cache, position_ids=torch.arange(120)[None])
        cache.end_context()
        layer = cache.tier_layers[0]
        assert isinstance(layer, SentenceKVLayer)
        # SnapKV keeps 2 * 24 tokens (44 scored + the 4-token window); the window and any kept start tokens stay hot.
        assert 2 * 24 - 4 - 4 <= sum(layer.sentence_sizes) <= 2 * 24 - 4
        assert layer.semantic.shape == (llama.config.num_key_value_heads, len(layer.sentence_sizes), 16)
        assert layer.buffer.length == 4 + 4  # only the start and the recent tokens stay hot
        steps = []
        for step in range(120, 126):
            llama(input_ids=torch.tensor([[5]]), cache=cache, position_ids=torch.tensor([[step]]))
            steps.append(list(layer.last_selected))
    everything = list(range(len(layer.sentence_sizes)))
    assert steps[0] == everything  # the first token of a new sentence attends every kept token
    budget = 24 - 4 - 4
    assert all(sum(layer.sentence_sizes[s] for s in chosen) <= budget for chosen in steps[1:])
    assert all(chosen != everything for chosen in steps[1:])


def test_end_to_end_with_the_engine(tiny_model_dir) -> None:
    lm = load(str(tiny_model_dir))
    prompt = build_prompt(lm, "The pass key is 4321. Remember it. " * 30, "What is the pass key?")
    policy = SentenceKV(token_budget=64, semantic_factor=2, window_size=8, start_budget=8, recent_budget=8)
    result = generate(lm, prompt, policy, GenerationConfig(max_new_tokens=5, stop_on_eos=False))
    assert len(result.token_ids) == 5
    assert result.stats.kv_tokens < prompt.context_ids.shape[1]
