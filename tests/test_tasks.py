from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tiermem.bench.tasks import make_sample, score
from tiermem.errors import TiermemError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
def test_samples_are_deterministic_and_hold_their_needle(tokenizer, task: str) -> None:
    a = make_sample(task, tokenizer, 1024, 0.5, 0, seed=7)
    b = make_sample(task, tokenizer, 1024, 0.5, 0, seed=7)
    c = make_sample(task, tokenizer, 1024, 0.5, 1, seed=7)
    assert a == b
    assert a.context != c.context
    assert a.answers[0] in a.context
    tokens = len(tokenizer(a.context).input_ids)
    assert 0.7 * 1024 < tokens < 1.05 * 1024


def test_depth_moves_the_needle(tokenizer) -> None:
    early = make_sample("needle", tokenizer, 2048, 0.1, 0)
    late = make_sample("needle", tokenizer, 2048, 0.9, 0)
    assert early.context.index(early.answers[0]) < 0.25 * len(early.context)
    assert late.context.index(late.answers[0]) > 0.75 * len(late.context)


def test_multikey_has_distractors(tokenizer) -> None:
    sample = make_sample("multikey", tokenizer, 1024, 0.5, 0)
    assert sample.context.count("One of the special magic numbers for") == 4


def test_scoring_is_ruler_string_match_all() -> None:
    assert score(" 1234567. That is it.", ("1234567",))
    assert not score("123456", ("1234567",))
    assert score("ABC and def", ("abc", "DEF"))


def test_bad_task_arguments(tokenizer) -> None:
    with pytest.raises(TiermemError):
        make_sample("unknown", tokenizer, 1024, 0.5, 0)
    with pytest.raises(TiermemError):
        make_sample("needle", tokenizer, 1024, 1.5, 0)
    with pytest.raises(TiermemError):
        make_sample("needle", tokenizer, 50, 0.5, 0)
