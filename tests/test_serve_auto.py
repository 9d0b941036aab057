"""``tiermem serve --policy auto`` (the default): each session's policy is chosen at its first turn and kept."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from tests.test_serve import serving
from tests.test_serve_sessions import make_worker, run_turn
from tiermem.memory import registry
from tiermem.memory.auto import LONG_CONTEXT
from tiermem.models import LoadedModel, load
from tiermem.serve.sessions import SUFFIX

POSITIONS = 1024  # the tiny model's (tests/conftest.py: tiny_model_dir)


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load(str(tiny_model_dir))


def prompt(n: int, seed: int = 5) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


FULL, LONG = repr(registry.build("full")), repr(registry.build(LONG_CONTEXT))


def policies_of(worker: object) -> dict[str, str]:
    """Each session's policy, by ``repr`` (name and parameters)."""
    return {s.id: repr(s.policy) for s in worker.store.sessions.values()}  # type: ignore[attr-defined]


def test_auto_chooses_once_per_session_and_keeps_it(lm: LoadedModel, tmp_path: Path) -> None:
    worker = make_worker(lm, registry.build("auto"), tmp_path)
    short = prompt(60)
    first = run_turn(worker, short)
    assert set(policies_of(worker).values()) == {FULL}
    history = [*short, *first["ids"], *prompt(40, seed=6)]
    second = run_turn(worker, history)  # continues the session under full
    assert second["session"] == first["session"] and second["cached_tokens"] >= len(short)
    long = prompt(POSITIONS + 40, seed=7)  # past the model's positions: auto picks block memory for this one
    third = run_turn(worker, long)
    assert third["cached_tokens"] == 0 and policies_of(worker)[third["session"]] == LONG
    assert policies_of(worker)[first["session"]] == FULL  # the first session kept its choice
    fourth = run_turn(worker, [*long, *third["ids"], 9, 10, 11])
    assert fourth["session"] == third["session"] and fourth["cached_tokens"] >= len(long)


def test_a_conversation_that_outgrows_full_moves_to_a_new_session(lm: LoadedModel, tmp_path: Path) -> None:
    worker = make_worker(lm, registry.build("auto"), tmp_path)
    history = prompt(900)
    first = run_turn(worker, history, max_tokens=4)
    history += [*first["ids"], *prompt(150, seed=8)]  # over 1024 tokens: full attention cannot continue
    second = run_turn(worker, history, max_tokens=4)
    assert second["session"] != first["session"] and second["cached_tokens"] == 0
    assert policies_of(worker) == {first["session"]: FULL, second["session"]: LONG}


def test_auto_with_a_budget_compresses_every_session(lm: LoadedModel, tmp_path: Path) -> None:
    worker = make_worker(lm, registry.build("auto", kv_budget=96), tmp_path)
    history = prompt(200)
    first = run_turn(worker, history)
    (policy,) = [s.policy for s in worker.store.sessions.values()]
    assert repr(policy) == repr(registry.build("snapkv-sentence", kv_budget=96, budget_includes_new=True))
    history += [*first["ids"], *prompt(60, seed=9)]
    assert run_turn(worker, history)["session"] == first["session"]


def test_auto_sessions_spill_restart_and_restore_identically(lm: LoadedModel, tmp_path: Path) -> None:
    """RAM -> disk -> restore under auto gives the never-spilled tokens; a restart rebuilds each session's chosen
    policy from its file; a file whose policy was tampered with is set aside, the others still serve."""
    auto = registry.build("auto")
    runs = {}
    for name, kv_memory in (("kept", None), ("spilled", 1)):
        worker = make_worker(lm, auto, tmp_path / name, kv_memory=kv_memory, choose_memory=None)
        a, b = prompt(60), prompt(POSITIONS + 20, seed=11)
        out = []
        for history in (a, b):
            result = run_turn(worker, history)
            history += [*result["ids"], 21, 22, 23]
            out.append((result, run_turn(worker, history)))
            history += out[-1][1]["ids"]  # the conversation so far, as a client would resend it
        runs[name] = (worker, out, a, b)
    kept, spilled = runs["kept"][1], runs["spilled"][1]
    assert [(x["ids"], y["ids"], y["cached_tokens"]) for x, y in spilled] == [
        (x["ids"], y["ids"], y["cached_tokens"]) for x, y in kept
    ]
    worker, _, a, b = runs["spilled"]
    assert worker.store.stats().restored == 2 and set(policies_of(worker).values()) == {FULL, LONG}

    folder = tmp_path / "spilled"
    restarted = make_worker(lm, auto, folder)
    assert sorted(policies_of(restarted).values()) == sorted(policies_of(worker).values())
    assert run_turn(restarted, [*b, 1, 2])["cached_tokens"] >= len(b) - 1  # all it held (the last id was not fed)
    a_id = next(sid for sid, name in policies_of(restarted).items() if name == FULL)
    path = folder / f"{a_id}{SUFFIX}"
    data = path.read_bytes()
    tampered = data.replace(b'"class":"tiermem.memory.full:Full"', b'"class":"tiermem.memory.tova:TOVA"')
    assert tampered != data
    path.write_bytes(tampered)
    again = make_worker(lm, auto, folder)
    assert a_id not in again.store.sessions and (folder / f"{a_id}{SUFFIX}.corrupt").exists()
    assert run_turn(again, [*a, 1])["cached_tokens"] == 0


def test_serve_defaults_to_auto(chat_model_dir: Path, tmp_path: Path) -> None:
    too_long = {"model": str(chat_model_dir), "messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 4}
    with serving(chat_model_dir, tmp_path / "auto") as served:
        short = {**too_long, "messages": [{"role": "user", "content": "hello"}]}
        assert httpx.post(f"{served.url}/v1/chat/completions", json=short, timeout=60).status_code == 200
        assert httpx.post(f"{served.url}/v1/chat/completions", json=too_long, timeout=120).status_code == 200
        status = httpx.get(f"{served.url}/tiermem/status").json()
    assert status["policy"].startswith("Auto(")
    assert sorted(row["policy"] for row in status["yours"]) == sorted(["full", registry.build(LONG_CONTEXT).name])
    with serving(chat_model_dir, tmp_path / "full", "--policy", "full") as served:
        response = httpx.post(f"{served.url}/v1/chat/completions", json=too_long, timeout=60)
    assert response.status_code == 400, response.text
    error = json.loads(response.text)["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_serve import with_role_template

    return with_role_template(tiny_model_dir, tmp_path_factory.mktemp("tiny-chat-auto") / "model")
