"""Two servers over one sessions folder (what ``tiermem serve --ray`` replicas share), without Ray: a conversation
moves between them turn by turn and each turn reuses the whole history the other one wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.test_serve import with_role_template
from tiermem.cli import build_parser
from tiermem.serve.cli import build
from tiermem.serve.shared_sessions import SharedResponseStore, SharedSessionStore


def server(model: Path, folder: Path) -> Any:
    args = build_parser().parse_args(["serve", "--model", str(model), "--sessions-dir", str(folder)])
    return build(args, session_store=SharedSessionStore, response_store=SharedResponseStore)


def test_a_conversation_moves_between_servers_without_losing_its_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = with_role_template(tiny_model_dir, tmp_path / "model")
    folder = tmp_path / "sessions"
    history: list[dict[str, str]] = [{"role": "user", "content": "The pass key is 4321. Remember it."}]
    with TestClient(server(model, folder)) as a, TestClient(server(model, folder)) as b:
        previous, cached, sessions = 0, [], []
        for turn, client in enumerate([a, b, a, b]):  # a and b both started before any file existed
            body = {"model": str(model), "messages": history, "max_tokens": 4, "temperature": 0}
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            usage = reply.json()["usage"]
            cached.append(usage["prompt_tokens_details"]["cached_tokens"] >= previous > 0)
            sessions.append(reply.headers["x-tiermem-session"])
            previous = usage["prompt_tokens"]
            history.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
            history.append({"role": "user", "content": f"Turn {turn + 1}: the pass key?"})
        # Turn 3 on a: its RAM copy from turn 1 is older than b's file; it must restore b's state, not reuse its own.
        assert cached == [False, True, True, True]
        assert len(set(sessions)) == 1  # one session, carried between the servers through its file
        first = a.post("/v1/responses", json={"model": str(model), "input": "Remember 7341.", "max_output_tokens": 2})
        assert first.status_code == 200, first.text
        follow = {"model": str(model), "input": "What?", "previous_response_id": first.json()["id"]}
        second = b.post("/v1/responses", json={**follow, "max_output_tokens": 2})  # a response made by the other
        assert second.status_code == 200, second.text
