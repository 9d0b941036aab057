"""``tiermem serve --ray`` on a real local Ray (loopback, started and stopped here): 2 Serve replicas, 16 multi-turn
conversations through the openai client, each pinned to one replica and served from its stored session; one
replica killed mid-run, its conversations continue on another replica from the shared sessions folder."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_serve import free_port, with_role_template
from tiermem.cli import build_parser
from tiermem.raycluster import Cluster, connect, disconnect
from tiermem.serve.ray_serve import affinity_key, check, rendezvous

pytestmark = pytest.mark.slow
CONVERSATIONS = 16
TURNS = 4
KILL_BEFORE_TURN = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    joined = connect(None, num_cpus=2)
    assert joined.address.startswith("127.0.0.1:")
    yield joined
    from ray import serve

    serve.shutdown()
    disconnect(joined)


def test_affinity_key_is_the_conversation_start() -> None:
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The key is 4321."}]
    later = [*first, {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "The key?"}]
    other = [first[0], {"role": "user", "content": "The key is 1234."}]
    chat = "/v1/chat/completions"

    def key(path: str, body: dict[str, Any], auth: str = "Bearer a") -> str | None:
        import json

        return affinity_key(path, {"authorization": auth}, json.dumps(body).encode())

    assert key(chat, {"messages": first}) == key(chat, {"messages": later}) is not None
    assert key(chat, {"messages": first}) != key(chat, {"messages": other})
    assert key(chat, {"messages": first}) != key(chat, {"messages": first}, auth="Bearer b")  # per user
    assert key(chat, {"messages": first, "prompt_cache_key": "c1"}) == key(
        chat, {"messages": other, "prompt_cache_key": "c1"}
    )
    long = "x" * 300
    assert key("/v1/completions", {"prompt": long}) == key("/v1/completions", {"prompt": long + " more"})
    assert key("/v1/completions", {"prompt": list(range(80))}) == key("/v1/completions", {"prompt": list(range(90))})
    assert key("/health", {}) is None and affinity_key(chat, {}, b"not json") is None


def test_rendezvous_moves_only_the_keys_of_a_replica_that_left() -> None:
    keys = [f"k{i}" for i in range(400)]

    def owner(key: str, replicas: list[str]) -> str:
        return max(replicas, key=lambda r: rendezvous(key, r))

    before = {k: owner(k, ["a", "b"]) for k in keys}
    assert 150 < Counter(before.values())["a"] < 250  # balanced
    after = {k: owner(k, ["b", "c"]) for k in keys}  # a died, c replaced it
    assert all(after[k] == "b" for k in keys if before[k] == "b" and owner(k, ["b", "c"]) != "c")
    assert all(after[k] in ("b", "c") for k in keys)
    moved_from_b = sum(before[k] == "b" and after[k] == "c" for k in keys)
    assert moved_from_b < 0.7 * sum(before[k] == "b" for k in keys)  # b keeps most of its own


def _kill(replica: str) -> None:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"#{replica}")]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def test_replicas_keep_sessions_and_survive_a_kill(cluster: Cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tiermem.serve.ray_serve import start

    model = with_role_template(tiny_model_dir, tmp_path / "model")
    port = free_port()
    argv = ["serve", "--ray", "--replicas", "2", "--model", str(model), "--sessions-dir", str(tmp_path / "sessions")]
    args = build_parser().parse_args([*argv, "--port", str(port), "--max-tokens", "4"])
    check(args)
    client = openai.OpenAI(base_url=f"{start(args)}/v1", api_key="x", max_retries=0, timeout=180)
    histories = [
        [{"role": "user", "content": f"Conversation {i}: the pass key is {4000 + i}. Remember it."}]
        for i in range(CONVERSATIONS)
    ]
    served: list[list[str]] = [[] for _ in range(CONVERSATIONS)]
    reused, later_turns, killed = 0, 0, ""
    previous = [0] * CONVERSATIONS  # prompt tokens of each conversation's last turn
    for turn in range(TURNS):
        if turn == KILL_BEFORE_TURN:
            killed = Counter(s[-1] for s in served).most_common(1)[0][0]
            _kill(killed)
        for i, history in enumerate(histories):
            raw = client.chat.completions.with_raw_response.create(
                model=str(model), messages=history, max_tokens=4, temperature=0
            )
            reply = raw.parse()
            served[i].append(raw.headers["x-tiermem-replica"])
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            cached = reply.usage.prompt_tokens_details.cached_tokens or 0
            if turn:
                later_turns += 1
                reused += cached >= previous[i]  # the whole conversation so far came from the stored session
            history += [{"role": "assistant", "content": reply.choices[0].message.content or ""}]
            history += [{"role": "user", "content": f"Turn {turn + 1}: what is the pass key?"}]
            previous[i] = reply.usage.prompt_tokens
    assert all(len(s) == TURNS for s in served)  # every turn of every conversation was answered
    chunks = list(
        client.chat.completions.create(
            model=str(model), messages=histories[0], max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    usage = chunks[-1].usage  # SSE passes through the ingress, chunk by chunk
    assert len(chunks) >= 3 and usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) >= previous[0]
    before = [s[:KILL_BEFORE_TURN] for s in served]
    assert all(len(set(s)) == 1 for s in before)  # pinned: one replica per conversation
    assert len({s[0] for s in before}) == 2  # and both replicas took conversations
    moved = [s for s in served if s[0] == killed]
    assert moved and all(killed not in s[KILL_BEFORE_TURN:] for s in moved)  # continued on another replica
    assert reused >= 0.9 * later_turns, f"{reused}/{later_turns} turns served from stored sessions"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--no-durable", "--sessions-dir", "s"], "--ray needs --durable"),
        ([], "--ray needs --sessions-dir"),
        (["--replicas", "0", "--sessions-dir", "s"], "--replicas must be at least 1"),
    ],
)
def test_serve_ray_refuses_bad_flags(
    flags: list[str], message: str, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiermem.cli import main

    assert main(["serve", "--ray", "--model", str(tiny_model_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
