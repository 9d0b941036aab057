"""Retrieval-head calibration finds planted heads; "heads" retrieval picks the block the question matches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tests.conftest import tiny
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import prefill, probe_question
from tiermem.memory import InfLLM
from tiermem.memory import retrieval_heads as rh
from tiermem.memory.context_memory import ContextMemoryLayer
from tiermem.memory.head_retrieval import SharedRetrieval
from tiermem.memory.retrieval_heads import RetrievalHeads, block_scores, calibrate, combine

PLANTED = (0, 1)  # (layer, query head) made to match the needle's subject words


@pytest.fixture(scope="module")
def planted() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random Llama with a word-level tokenizer over the calibration's words, and one head whose query and
    key both project onto the embeddings of the subject words: q.k is largest where the question's subject word
    meets the same word in the context (a copying head). Every other head keeps random weights."""
    words = sorted(
        {w for group in (*rh._WORDS.values(), *rh._SUBJECTS.values()) for item in group for w in item.split()}
    )
    words += [
        "The",
        "What",
        "is",
        "secret",
        "code",
        "of",
        "the",
        "Answer",
        "with",
        "number",
        "only",
        "near",
        "Question",
        ":",
        ".",
        "?",
        ",",
    ]
    vocab = {w: i for i, w in enumerate(["[UNK]", *dict.fromkeys(words)])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).eval()
    subject_ids = [vocab[w] for group in rh._SUBJECTS.values() for w in group]
    basis, _ = torch.linalg.qr(model.model.embed_tokens.weight[subject_ids].T.detach())  # (64, n_subject)
    projection = torch.zeros(32, 64)
    projection[: basis.shape[1]] = basis.T * 4
    layer, head = PLANTED
    attn = model.model.layers[layer].self_attn
    with torch.no_grad():
        attn.q_proj.weight[head * 32 : (head + 1) * 32] = projection
        attn.k_proj.weight[:] = projection  # the only KV head, read by the planted query head
    return model, tokenizer


def test_block_scores_take_the_max_over_queries_and_block_tokens() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.5, 0.0], [0.0, 0.2], [3.0, 0.0], [0.0, -1.0], [0.0, 2.0]])
    assert block_scores(queries, keys, 2).tolist() == [0.5, 3.0, 2.0]
    assert block_scores(queries, keys, [1, 4]).tolist() == [0.5, 3.0]
    z = combine([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0]) * 10])
    assert torch.allclose(z, torch.zeros(3), atol=1e-6)  # z-scores: scale-free, opposite votes cancel


def test_calibration_finds_the_planted_retrieval_head(planted: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = planted
    found = calibrate(model, tokenizer, n_heads=2, prompts=4, length=600, block_size=16)
    assert found.heads[0] == PLANTED
    mrr = torch.tensor(found.mrr)
    others = mrr.flatten()[torch.arange(mrr.numel()) != PLANTED[0] * mrr.shape[1] + PLANTED[1]]
    # Distractor subjects may share a word with the asked one (a tie, counted against the needle): not always 1.
    assert mrr[PLANTED] >= 0.5 and mrr[PLANTED] > others.max() + 0.2


def test_calibration_is_cached_per_model(
    planted: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = planted
    calls = []

    def fake(*args: object, **kwargs: object) -> RetrievalHeads:
        calls.append(1)
        return RetrievalHeads([PLANTED], [[0.0]], 1)

    monkeypatch.setattr(rh, "calibrate", fake)
    first = rh.retrieval_heads(model, tokenizer, 1, folder=tmp_path)
    again = rh.retrieval_heads(model, tokenizer, 1, folder=tmp_path)
    assert first.heads == again.heads == [PLANTED] and len(calls) == 1
    other = LlamaForCausalLM(model.config).eval()  # another model (same config, other weights): calibrated anew
    rh.retrieval_heads(other, tokenizer, 1, folder=tmp_path)
    assert len(calls) == 2


def test_heads_retrieval_picks_the_block_the_question_names(
    planted: tuple[PreTrainedModel, PreTrainedTokenizerBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filler with one subject's code far outside the window; the question names the subject. The shared decision
    (taken from the planted head alone) retrieves the block that holds it, for every layer."""
    model, tokenizer = planted
    filler = "The old painter carried the green letter near the hill . " * 40
    needle = " The secret code of the amber falcon is 7 . "
    text = filler[:900] + needle + filler[900:]
    context = tokenizer(text, return_tensors="pt").input_ids  # word-level: one token per word
    question = tokenizer(" What is the secret code of the amber falcon ?", return_tensors="pt").input_ids
    policy = InfLLM(n_init=4, n_local=64, block_size=16, topk=2, exc_block_size=32, retrieval="heads")
    heads = RetrievalHeads([PLANTED], [[0.0]], 1)
    monkeypatch.setattr("tiermem.memory.context_memory.retrieval_heads", lambda *args: heads)
    cache = TierCache(model, policy, tokenizer=tokenizer)
    layers = [layer for layer in cache.tier_layers if isinstance(layer, ContextMemoryLayer)]
    assert all(isinstance(layer.shared, SharedRetrieval) for layer in layers)
    with torch.inference_mode(), patched_attention(model):
        prefill(model, cache, context, 32)
        seen = cache.get_seq_length()
        probe_question(model, cache, context, question)
        assert cache.get_seq_length() == seen  # the probe stored nothing
    start = len(tokenizer(text[: text.index(needle)]).input_ids)
    stop = len(tokenizer(text[: text.index(needle) + len(needle)]).input_ids)
    layer = layers[0]
    holding = {i for i, s in enumerate(layer.block_starts) if s < stop and s + layer.block_sizes[i] > start}
    assert holding and set(layer.fixed_blocks or []) & holding
    assert all(other.fixed_blocks == layer.fixed_blocks for other in layers)


def test_calibration_skips_local_layers(planted: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """Gemma3's sliding-window layers never hold block memory, so no head of theirs is chosen."""
    _, tokenizer = planted
    model = tiny("gemma3")  # layers 0, 1, 3 local; 2 global
    found = calibrate(model, tokenizer, n_heads=3, prompts=2, length=300, block_size=16)
    assert {layer for layer, _ in found.heads} == {2}
