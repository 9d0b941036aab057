"""The bundled models end to end (slow: converting a GGUF takes 20-60 s the first time; run in CI all the same)."""

from __future__ import annotations

import pytest
import torch

from tiermem.bench.tasks import make_sample, score
from tiermem.engine import GenerationConfig, generate
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import build
from tiermem.models import load
from tiermem.prompts import build_prompt

pytestmark = pytest.mark.slow


def hf_greedy(lm, prompt, n: int) -> list[int]:
    ids = torch.cat([prompt.context_ids, prompt.question_ids], dim=1)
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_smollm2_matches_transformers_and_finds_a_needle() -> None:
    lm = load("smollm2")
    sample = make_sample("needle", lm.tokenizer, 1024, 0.5, 0)
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    assert prompt.style == "chat"
    result = generate(lm, prompt, build("full"), GenerationConfig(max_new_tokens=12, chunk_size=256))
    assert result.token_ids == hf_greedy(lm, prompt, 12)[: len(result.token_ids)]
    assert score(result.text, sample.answers), result.text
    # Question-aware SnapKV (the paper's setting) keeps the needle at a quarter of the prompt.
    aware = GenerationConfig(max_new_tokens=12, question_aware=True)
    compressed = generate(lm, prompt, build("snapkv-chunk", kv_budget=256), aware)
    assert compressed.stats.kv_tokens == 256
    assert score(compressed.text, sample.answers), compressed.text


def test_gemma3_sliding_windows_match_transformers() -> None:
    lm = load("gemma3-270m")
    assert not lm.has_chat_template
    sample = make_sample("passkey", lm.tokenizer, 1024, 0.3, 0)  # longer than the 512-token local window
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    assert prompt.style == "completion"
    result = generate(lm, prompt, build("full"), GenerationConfig(max_new_tokens=8, chunk_size=300))
    assert result.token_ids == hf_greedy(lm, prompt, 8)[: len(result.token_ids)]
    assert score(result.text, sample.answers), result.text


def test_smollm2_finds_a_passkey_past_its_trained_window_with_disk_memory(tmp_path) -> None:
    """12k tokens, past SmolLM2's 8192 positions: infllm-small retrieves the passkey block from a disk store under a
    KV limit far below the whole cache (12k tokens x 46 KiB = 550 MiB)."""
    lm = load("smollm2")
    sample = make_sample("passkey", lm.tokenizer, 12288, 0.4, 0)
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    store = StoreConfig(backend="disk", folder=str(tmp_path))
    config = GenerationConfig(max_new_tokens=8, kv_memory=128 * 2**20, store=store)
    result = generate(lm, prompt, build("infllm-small"), config)
    assert score(result.text, sample.answers), result.text
    assert result.stats.kv_bytes_peak <= 128 * 2**20
    assert int(result.stats.extra["kv_disk_bytes"]) > 400 * 2**20
    assert not list(tmp_path.iterdir())  # the store's folder is removed
