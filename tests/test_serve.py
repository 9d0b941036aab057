"""tiermem serve over HTTP, driven by the real ``openai`` client (sync and async, streamed and not)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from tiermem.cli import build_parser
from tiermem.serve.cli import build

ROLE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_role_template(tiny_model_dir: Path, folder: Path) -> Path:
    """A copy of the tiny model whose template renders each role (the conftest one renders every turn as user's)."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ROLE_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_role_template(tiny_model_dir, tmp_path_factory.mktemp("tiny-chat") / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    model: str
    app: Any

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def async_client(self, key: str = "none") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@contextmanager
def serving(model_dir: Path, sessions: Path, *options: str) -> Iterator[Served]:
    """``tiermem serve`` (parsed by the real CLI parser) on 127.0.0.1 and a free port, in a thread."""
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--sessions-dir", str(sessions), *options])
    app = build(args)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", str(model_dir), app)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def served(chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(chat_model_dir, tmp_path_factory.mktemp("sessions"), "--max-tokens", "16") as s:
        yield s


def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"messages": messages, "temperature": 0, "max_tokens": 8, "extra_body": {"return_token_ids": True}}


def test_models_and_health(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == [served.model]
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["model"] == served.model


def test_chat_stream_equals_whole(served: Served) -> None:
    client = served.client()
    messages = [{"role": "user", "content": "What is the pass key?"}]
    whole = client.chat.completions.create(model=served.model, **ask(messages))
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == len(whole.choices[0].model_extra["token_ids"])
    assert whole.usage.prompt_tokens_details is not None
    stream = client.chat.completions.create(
        model=served.model, messages=messages, temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    # The stream's turn resent the same prompt: all but its last token was already held.
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_completions_text_and_token_ids(served: Served) -> None:
    client = served.client()
    text = client.completions.create(model=served.model, prompt="The quick brown", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.usage is not None and text.usage.completion_tokens <= 5
    ids = [5, 17, 42, 99, 7, 8]
    by_ids = client.completions.create(model=served.model, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=served.model, prompt=ids, max_tokens=5, temperature=0, stream=True)
    )
    assert streamed == by_ids.choices[0].text


def test_async_client_streams(served: Served) -> None:
    async def run() -> tuple[str, str]:
        client = served.async_client()
        messages = [{"role": "user", "content": "A needle hides in a haystack."}]
        whole = await client.chat.completions.create(model=served.model, **ask(messages))
        stream = await client.chat.completions.create(
            model=served.model, messages=messages, temperature=0, max_tokens=8, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return str(whole.choices[0].message.content), "".join(pieces)

    whole, streamed = asyncio.run(run())
    assert whole == streamed


def test_sampling_is_seeded(served: Served) -> None:
    client = served.client()
    kwargs: dict[str, Any] = {"model": served.model, "prompt": [3, 4, 5], "max_tokens": 12, "temperature": 1.0}
    first = client.completions.create(seed=7, **kwargs).choices[0].text
    assert client.completions.create(seed=7, **kwargs).choices[0].text == first
    assert any(client.completions.create(seed=s, **kwargs).choices[0].text != first for s in range(8, 12))


def test_stop_string_cuts_and_is_never_streamed(served: Served) -> None:
    client = served.client()
    kwargs: dict[str, Any] = {"model": served.model, "prompt": [9, 10, 11], "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]
    cut = client.completions.create(stop=stop, **kwargs)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kwargs))
    assert streamed == cut.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
    ],
)
def test_bad_requests_are_openai_errors(served: Served, body: dict[str, Any], status: int, param: str) -> None:
    payload = {"model": served.model, **body}
    response = httpx.post(f"{served.url}/v1/chat/completions", json=payload, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_malformed_bodies_and_paths(served: Served) -> None:
    url = f"{served.url}/v1/chat/completions"
    for content in (b"{bad", b"[1, 2]", b""):
        response = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "error" in response.json()
    for path in ("/v1/nothing", "/v1/../../etc/passwd", "/v1/sessions/..%2F..%2Fx"):
        response = httpx.get(f"{served.url}{path}")
        assert response.status_code == 404 and "error" in response.json()
    with pytest.raises(openai.BadRequestError):
        served.client().completions.create(model=served.model, prompt=[10**6], max_tokens=2)


def test_metrics_count_requests_tokens_and_tiers(served: Served) -> None:
    served.client().completions.create(model=served.model, prompt=[1, 2, 3], max_tokens=3, temperature=0)
    text = httpx.get(f"{served.url}/metrics").text
    assert 'tiermem_requests_total{endpoint="/v1/completions",status="200"}' in text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["tiermem_prompt_tokens_total"] >= 3 and values["tiermem_completion_tokens_total"] >= 1
    assert values["tiermem_ttft_seconds_count"] >= 1
    assert values['tiermem_sessions{tier="ram"}'] >= 1 and values['tiermem_kv_bytes{tier="ram"}'] > 0
    assert values['tiermem_sessions{tier="disk"}'] >= 1  # durable by default


def test_api_keys(chat_model_dir: Path, tmp_path: Path) -> None:
    with serving(chat_model_dir, tmp_path, "--api-key", "k-alice", "--api-key", "k-bob") as s:
        assert httpx.get(f"{s.url}/health").status_code == 200
        for key in ("wrong", "k-alic", "k-alice2"):
            with pytest.raises(openai.AuthenticationError):
                s.client(key).models.list()
        response = httpx.get(f"{s.url}/v1/models")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        messages = [{"role": "user", "content": "The pass key is 4321. What is the pass key?"}]
        first = s.client("k-alice").chat.completions.create(model=s.model, **ask(messages))
        history = [*messages, {"role": "assistant", "content": first.choices[0].message.content or ""}]
        history.append({"role": "user", "content": "Again?"})
        alice = s.client("k-alice").chat.completions.create(model=s.model, **ask(history))
        bob = s.client("k-bob").chat.completions.create(model=s.model, **ask(history))
        assert alice.usage is not None and bob.usage is not None
        assert alice.usage.prompt_tokens_details.cached_tokens > 0
        assert bob.usage.prompt_tokens_details.cached_tokens == 0
        assert alice.choices[0].model_extra["token_ids"] == bob.choices[0].model_extra["token_ids"]


def test_disconnect_mid_stream_frees_the_worker(served: Served) -> None:
    before = httpx.get(f"{served.url}/metrics").text
    body = {"model": served.model, "prompt": [1, 2], "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=30) as response:
        for _ in response.iter_lines():
            break  # read the first event, then hang up
    done = served.client().completions.create(model=served.model, prompt=[4, 5], max_tokens=2, temperature=0)
    assert done.usage is not None
    after = httpx.get(f"{served.url}/metrics").text

    def completion(text: str) -> float:
        return next(float(x.split()[1]) for x in text.splitlines() if x.startswith("tiermem_completion_tokens_total"))

    assert completion(after) - completion(before) < 900  # the abandoned stream stopped early


def test_full_queue_answers_429_with_retry_after(chat_model_dir: Path, tmp_path: Path) -> None:
    # StreamingLLM bounds positions, so a turn may run for as long as the client listens.
    options = ("--max-queue", "1", "--max-batch", "1", "--policy", "streaming", "--kv-budget", "64")
    with serving(chat_model_dir, tmp_path, *options) as s:
        long = {"model": s.model, "prompt": [1, 2], "max_tokens": 10**6, "stream": True, "ignore_eos": True}
        short = {"model": s.model, "prompt": [3, 4], "max_tokens": 2, "temperature": 0}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=long, timeout=60) as running:
            lines = running.iter_lines()  # kept referenced: a collected iterator would close the stream
            next(lines)  # the worker is busy with this stream
            queued = threading.Thread(target=httpx.post, args=(f"{s.url}/v1/completions",), kwargs={"json": short})
            queued.start()
            deadline = time.monotonic() + 30
            while httpx.get(f"{s.url}/health").json()["queue"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = httpx.post(f"{s.url}/v1/completions", json=short)
        queued.join(timeout=60)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"


def test_concurrent_turns_share_decode_steps_and_match_sequential(chat_model_dir: Path, tmp_path: Path) -> None:
    prompts = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46], [90, 91]]

    async def run(url: str, model: str) -> list[list[int]]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        extra = {"return_token_ids": True, "ignore_eos": True}
        calls = [
            client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0, extra_body=extra)
            for p in prompts
        ]
        answers = await asyncio.gather(*calls)
        await client.close()
        return [a.choices[0].model_extra["token_ids"] for a in answers]  # type: ignore[index]

    def steps(url: str) -> tuple[float, float]:
        text = httpx.get(f"{url}/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
        return values["tiermem_decode_steps_total"], values["tiermem_decode_rows_total"]

    with serving(chat_model_dir, tmp_path / "b", "--max-batch", "4") as batched:
        together = asyncio.run(run(batched.url, batched.model))
        step_count, rows = steps(batched.url)
    with serving(chat_model_dir, tmp_path / "s", "--max-batch", "1") as single:
        alone = asyncio.run(run(single.url, single.model))
        assert steps(single.url)[0] == steps(single.url)[1]  # one row per step
    assert together == alone
    assert rows == 3 * 23 and step_count < rows  # rows shared steps


def test_page_and_status_view(chat_model_dir: Path, tmp_path: Path) -> None:
    with serving(chat_model_dir, tmp_path, "--api-key", "k1", "--api-key", "k2", "--kv-memory", "1") as s:
        page = httpx.get(f"{s.url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for used in ('"/v1/chat/completions"', '"/tiermem/status"', '"/v1/models"'):
            assert used in page.text
        assert httpx.get(f"{s.url}/tiermem/status").status_code == 401
        s.client("k1").completions.create(model=s.model, prompt=[1, 2, 3], max_tokens=2, temperature=0)
        mine = httpx.get(f"{s.url}/tiermem/status", headers={"authorization": "Bearer k1"}).json()
        theirs = httpx.get(f"{s.url}/tiermem/status", headers={"authorization": "Bearer k2"}).json()
        assert mine["kv_memory"] == 1 and mine["sessions"] == {"ram": 0, "disk": 1}  # spilled under a 1-byte limit
        assert [x["tier"] for x in mine["yours"]] == ["disk"] and mine["yours"][0]["tokens"] >= 3
        assert theirs["yours"] == []


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (syntax check of the page's script)")
def test_page_script_parses(tmp_path: Path) -> None:
    from tiermem.serve.page import PAGE

    script = tmp_path / "page.js"
    script.write_text(PAGE.split("<script>")[1].split("</script>")[0])
    checked = subprocess.run(["node", "--check", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_loadtest_reports_reuse(served: Served) -> None:
    from tiermem.serve.loadtest import run

    args = argparse.Namespace(url=served.url, api_key="x", chats=2, turns=3, words=8, max_tokens=4, seed=0)
    summary = asyncio.run(run(args))
    assert summary["cached_fraction"] > 0.3
    later = summary["by_turn"][2]
    assert later["new_tokens"] < later["prompt_tokens"] / 2  # the history was not prefilled again


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "70000"], "--port"),
        (["--policy", "snapkv"], "needs --kv-budget"),
        (["--policy", "nope"], "unknown policy"),
        (["--max-batch", "0"], "--max-batch"),
        (["--decode-per-chunk", "0"], "--decode-per-chunk"),
    ],
)
def test_serve_cli_errors_are_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    from tiermem.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--sessions-dir", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiermem: error:") and message in err and "Traceback" not in err
