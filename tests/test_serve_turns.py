"""Per-turn cost in a session: a policy that compresses a prompt once (SnapKV, the kvpress-style scorers) compresses
every turn's new tokens in a session, so the memory a turn reads stays bounded however long the chat runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_serve_sessions import make_worker, run_turn, small_policy
from tiermem.memory import registry
from tiermem.memory.base import Policy
from tiermem.models import LoadedModel, load

TURNS, NEW = 8, 40


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load(str(tiny_model_dir))


def held_per_turn(lm: LoadedModel, folder: Path, policy: Policy) -> list[int]:
    """KV tokens the session's largest layer holds after each turn of a stateless client's chat (``NEW`` new
    tokens per turn plus a 6-token answer)."""
    worker = make_worker(lm, policy, folder)
    gen = torch.Generator().manual_seed(4)
    history: list[int] = []
    held = []
    for turn in range(TURNS):
        history += torch.randint(3, 300, (NEW,), generator=gen).tolist()
        result = run_turn(worker, history, max_tokens=6)
        assert turn == 0 or result["cached_tokens"] >= len(history) - NEW - 1  # the session was continued
        history += result["ids"]
        (session,) = worker.store.sessions.values()
        assert session.cache is not None
        held.append(session.cache.kv_tokens())
    return held


@pytest.mark.parametrize("name", ["snapkv", "snapkv-sentence", "tova", "pyramidkv", "expected-attention", "sentencekv"])
def test_compress_once_policies_compress_every_turn(lm: LoadedModel, tmp_path: Path, name: str) -> None:
    held = held_per_turn(lm, tmp_path / "a", small_policy(name))
    full = held_per_turn(lm, tmp_path / "b", registry.build("full"))
    assert full[-1] - full[2] >= (TURNS - 3) * NEW  # the history grows by a turn each turn
    assert max(held[2:]) - min(held[2:]) <= 6 and held[-1] < full[-1] / 3  # this one stays where it settled


def test_without_reopening_the_session_would_keep_everything(
    lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with the per-turn step switched off, SnapKV compresses the first prompt only and keeps every
    later token, growing like full attention."""
    monkeypatch.setattr("tiermem.serve.worker.reopen", lambda *args: None)
    held = held_per_turn(lm, tmp_path, small_policy("snapkv"))
    assert held[-1] - held[2] >= (TURNS - 3) * NEW


def test_a_compression_ratio_converges(lm: LoadedModel, tmp_path: Path) -> None:
    """Each turn removes half of what the layer holds: the memory converges to about one turn's tokens."""
    held = held_per_turn(lm, tmp_path, registry.build("snapkv", compression_ratio=0.5, window_size=8))
    assert max(held[3:]) <= 2 * (NEW + 6) and max(held[3:]) - min(held[3:]) <= 8


def test_sentence_units_follow_the_kept_tokens_after_a_compression(
    lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """snapkv-sentence cuts its units at sentence ends given as slots; once a turn was compressed, slot i no longer
    holds position i, so each later turn's compression gets the slots of the kept sentence ends."""
    from tiermem.memory import snapkv

    seen: list[tuple[int, list[int], int]] = []  # (turn, ends given, units' length) per layer compression
    turn = 0
    real = snapkv.sentence_units

    def spy(ends: list[int], length: int, max_tokens: int) -> torch.Tensor:
        seen.append((turn, list(ends), length))
        return real(ends, length, max_tokens)

    monkeypatch.setattr(snapkv, "sentence_units", spy)
    policy = small_policy("snapkv-sentence")
    worker = make_worker(lm, policy, tmp_path)
    text = " ".join(f"Fact {i} is {i * 7}." for i in range(60))
    ids = lm.tokenizer(text).input_ids
    history: list[int] = []
    for turn in range(3):
        history += ids[turn * 80 : (turn + 1) * 80]
        history += run_turn(worker, history, max_tokens=4)["ids"]
    (session,) = worker.store.sessions.values()
    assert session.cache is not None
    shared = session.cache.tier_layers[0].sentence_end_positions  # type: ignore[attr-defined]
    later = [(ends, length) for t, ends, length in seen if t > 0]
    assert later, "no turn after the first was compressed"
    window = policy.window_size  # type: ignore[attr-defined]
    for ends, length in later:  # slots inside the buffer, a sentence end every few tokens
        assert ends and ends == sorted(ends) and ends[-1] < length + window and len(ends) * 20 > length
    assert max(shared) >= min(length for _, length in later) + window  # as positions they would lie past the end
    assert shared == sorted(set(shared))  # the shared list of positions is left as it was
