"""``/v1/responses`` of tiermem serve, driven by the real ``openai`` client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.test_serve import Served, serving, with_role_template

GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 8}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_role_template(tiny_model_dir, tmp_path_factory.mktemp("tiny-chat") / "model")


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(model_dir, tmp_path_factory.mktemp("sessions"), "--api-key", "k1", "--api-key", "k2") as s:
        yield s


def test_chain_reuses_kv_and_equals_chat_completions(served: Served) -> None:
    client = served.client("k1")
    first = client.responses.create(model=served.model, input="The pass key is 4321.", **GREEDY)
    assert first.object == "response" and first.id.startswith("resp_") and first.output_text
    second = client.responses.create(
        model=served.model, input="What is the pass key?", previous_response_id=first.id, **GREEDY
    )
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    messages: list[Any] = [
        {"role": "user", "content": "The pass key is 4321."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is the pass key?"},
    ]
    chat = client.chat.completions.create(model=served.model, messages=messages, temperature=0, max_tokens=8)
    assert chat.choices[0].message.content == second.output_text
    assert chat.usage is not None and chat.usage.prompt_tokens == second.usage.input_tokens


def test_stream_events_assemble_the_response(served: Served) -> None:
    client = served.client("k1")
    whole = client.responses.create(model=served.model, input="A needle hides in a haystack.", **GREEDY)
    deltas, completed = [], None
    for event in client.responses.create(
        model=served.model, input="A needle hides in a haystack.", stream=True, **GREEDY
    ):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            completed = event.response
    assert completed is not None and "".join(deltas) == completed.output_text == whole.output_text
    assert client.responses.retrieve(completed.id).output_text == whole.output_text


def test_async_client(served: Served) -> None:
    async def run() -> tuple[str, str]:
        client = served.async_client("k2")
        first = await client.responses.create(model=served.model, input="Numbers like 12345 appear.", **GREEDY)
        follow = await client.responses.create(
            model=served.model, input="Which numbers?", previous_response_id=first.id, **GREEDY
        )
        await client.close()
        return first.id, follow.output_text

    ident, text = asyncio.run(run())
    assert isinstance(text, str)
    with pytest.raises(openai.NotFoundError):  # another key's response
        served.client("k1").responses.retrieve(ident)


def test_store_false_delete_and_bad_ids(served: Served) -> None:
    client = served.client("k1")
    unstored = client.responses.create(model=served.model, input="x", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    kept = client.responses.create(model=served.model, input="y", **GREEDY)
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=served.model, input="z", previous_response_id=kept.id, **GREEDY)
    for bad in ("resp_123", "../../etc/passwd", "resp_" + "g" * 32):
        response = httpx.get(f"{served.url}/v1/responses/{bad}", headers={"authorization": "Bearer k1"})
        assert response.status_code in (400, 404) and "error" in response.json()
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=served.model, input="x", truncation="auto")


def test_chain_survives_a_restart(model_dir: Path, tmp_path: Path) -> None:
    with serving(model_dir, tmp_path) as first_server:
        first = first_server.client().responses.create(model=first_server.model, input="Remember 4321.", **GREEDY)
    with serving(model_dir, tmp_path) as second_server:
        client = second_server.client()
        follow = client.responses.create(
            model=second_server.model, input="What number?", previous_response_id=first.id, **GREEDY
        )
        assert client.responses.retrieve(first.id).output_text == first.output_text
    assert follow.usage is not None and first.usage is not None
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
