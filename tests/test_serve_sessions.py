"""Sessions of tiermem serve: prefix reuse, rewind, spill to disk and restore, restart, corrupt files, limits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.test_serve import ask, free_port, serving, with_role_template
from tiermem.cache import TierCache
from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import StoreConfig
from tiermem.layer_info import describe_layers
from tiermem.memory import registry
from tiermem.memory.base import Policy
from tiermem.models import LoadedModel, load
from tiermem.serve.metrics import Metrics
from tiermem.serve.policies import SessionPolicies
from tiermem.serve.schemas import ApiError
from tiermem.serve.sessions import SUFFIX, SessionStore
from tiermem.serve.state import StateError, cache_state
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker

# Small settings, so a 100-token conversation is compressed, evicted or cut into blocks.
SMALL: dict[str, dict[str, Any]] = {
    "streaming": {"kv_budget": 24},
    "snapkv": {"kv_budget": 24, "window_size": 8},
    "snapkv-chunk": {"kv_budget": 40, "window_size": 8, "chunk_size": 8},
    "infllm": {"n_init": 8, "n_local": 24, "block_size": 8, "topk": 2, "exc_block_size": 16, "repr_topk": 2},
    "infllm-small": {"n_init": 8, "n_local": 24, "block_size": 8, "topk": 2, "exc_block_size": 16},
    "emllm": {"n_init": 8, "n_local": 24, "exc_block_size": 16, "min_block_size": 4, "max_block_size": 8, "n_mem": 16},
    "emllm-small": {"n_init": 8, "n_local": 24, "exc_block_size": 16, "min_block_size": 4, "max_block_size": 8},
    "sentencekv": {"token_budget": 32, "start_budget": 4, "recent_budget": 8, "window_size": 8},
}


def small_policy(name: str) -> Policy:
    """``name`` with small settings; unknown budgeted policies get the smallest budget they accept."""
    if name in SMALL:
        return registry.build(name, **SMALL[name])
    if not registry.takes_budget(name):
        return registry.build(name)
    for budget in (24, 48, 96):
        try:
            return registry.build(name, kv_budget=budget)
        except TiermemError:
            continue
    pytest.skip(f"policy '{name}' accepts no budget up to 96 tokens")


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load(str(tiny_model_dir))


def make_worker(
    lm: LoadedModel,
    policy: Policy,
    folder: Path,
    kv_memory: int | None = None,
    choose_memory: int | None = None,
    kv_dtype: str = "auto",
    **kw: Any,
) -> ModelWorker:
    """A worker and its store; ``choose_memory`` is the KV memory auto weighs (the server passes ``kv_memory``)."""

    def make_cache(chosen: Policy) -> TierCache:
        return TierCache(lm.model, chosen, StoreConfig(kv_dtype=kv_dtype), tokenizer=lm.tokenizer)

    key = {"model": "tiny", "policy": repr(policy), "dtype": str(lm.model.dtype), "kv_dtype": kv_dtype}
    policies = SessionPolicies(policy, describe_layers(lm.model, kv_dtype), choose_memory)
    return ModelWorker(lm, SessionStore(folder, key, policies, make_cache, kv_memory, **kw), Metrics())


def job_events(loop: asyncio.AbstractEventLoop, job: Job) -> dict[str, Any]:
    """The events a finished job emitted: start and done merged, an error under ``"error"``."""
    loop.run_until_complete(asyncio.sleep(0))
    events: dict[str, Any] = {}
    while not job.events.empty():
        kind, data = job.events.get_nowait()
        if kind in ("start", "done"):
            events.update(data)
        elif kind == "error":
            events["error"] = data
    return events


def run_turn(worker: ModelWorker, prompt: list[int], max_tokens: int = 6, owner: str = "") -> dict[str, Any]:
    """One greedy turn on the calling thread; returns the start and done events merged."""
    loop = asyncio.new_event_loop()
    try:
        job = Job(Turn(owner, max_tokens, 0.0, 1.0, 0, prompt=prompt), loop)
        worker._run(job)
        return job_events(loop, job)
    finally:
        loop.close()


def conversation(worker: ModelWorker, turns: int = 3) -> list[dict[str, Any]]:
    """A stateless client: each request resends the whole history (prompt, answers, new text) as token ids."""
    gen = torch.Generator().manual_seed(3)
    history: list[int] = []
    out = []
    for _ in range(turns):
        history += torch.randint(3, 300, (40,), generator=gen).tolist()
        result = run_turn(worker, history)
        history += result["ids"]
        out.append(result)
    return out


@pytest.mark.parametrize("name", registry.names())
def test_spill_and_restore_is_token_identical(lm: LoadedModel, tmp_path: Path, name: str) -> None:
    """Greedy turns after RAM -> disk -> restore give the never-spilled tokens, for every policy."""
    policy = small_policy(name)
    try:
        kept = conversation(make_worker(lm, policy, tmp_path / "ram"))
    except StateError as exc:
        pytest.skip(f"policy '{name}' keeps state the session file cannot hold: {exc}")
    except (RuntimeError, ValueError) as exc:  # the policy itself fails on this model, serving or not
        pytest.skip(f"policy '{name}' fails without spilling: {type(exc).__name__}: {exc}")
    spilling = make_worker(lm, policy, tmp_path / "disk", kv_memory=1)  # every idle session spills at once
    spilled = conversation(spilling)
    assert [t["ids"] for t in spilled] == [t["ids"] for t in kept]
    assert [t["cached_tokens"] for t in spilled] == [t["cached_tokens"] for t in kept]
    assert spilled[1]["cached_tokens"] >= 40 and spilled[2]["cached_tokens"] > spilled[1]["cached_tokens"]
    stats = spilling.store.stats()
    assert stats.restored == 2 and stats.sessions["ram"] == 0 and stats.sessions["disk"] == 1


@pytest.mark.parametrize("name", ["full", "streaming", "snapkv-sentence"])
def test_spill_and_restore_is_token_identical_in_the_fast_formats(
    tiny_model_dir: Path, tmp_path: Path, name: str
) -> None:
    """bf16 activations, int8 weights and int8 KV rows (the server's default formats): the stored bits come back."""
    fast = load(str(tiny_model_dir), "bfloat16", weights_quant="auto")
    policy = small_policy(name)
    kept = conversation(make_worker(fast, policy, tmp_path / "ram", kv_dtype="int8"))
    spilling = make_worker(fast, policy, tmp_path / "disk", kv_memory=1, kv_dtype="int8")
    spilled = conversation(spilling)
    assert [t["ids"] for t in spilled] == [t["ids"] for t in kept]
    assert [t["cached_tokens"] for t in spilled] == [t["cached_tokens"] for t in kept]
    assert spilling.store.stats().restored == 2


def test_restart_resumes_from_files(lm: LoadedModel, tmp_path: Path) -> None:
    policy = small_policy("infllm")
    reference = conversation(make_worker(lm, policy, tmp_path / "a"))
    first = make_worker(lm, policy, tmp_path / "b")
    gen = torch.Generator().manual_seed(3)
    history = torch.randint(3, 300, (40,), generator=gen).tolist()
    history += run_turn(first, history)["ids"]
    restarted = make_worker(lm, policy, tmp_path / "b")  # a new process would index the same folder
    assert len(restarted.store.sessions) == 1
    history += torch.randint(3, 300, (40,), generator=gen).tolist()
    second = run_turn(restarted, history)
    assert second["ids"] == reference[1]["ids"] and second["cached_tokens"] == reference[1]["cached_tokens"]
    other = make_worker(lm, small_policy("streaming"), tmp_path / "b")  # another policy: never reused
    assert not other.store.sessions


def test_rewind_after_an_edit_equals_a_cold_run(lm: LoadedModel, tmp_path: Path) -> None:
    policy = registry.build("full")
    worker = make_worker(lm, policy, tmp_path / "w")
    prompt = list(range(10, 70))
    first = run_turn(worker, prompt)
    edited = [*prompt[:50], 5, 6, 7]  # the client changed the end of its message
    warm = run_turn(worker, edited)
    cold = run_turn(make_worker(lm, policy, tmp_path / "c"), edited)
    assert first["cached_tokens"] == 0 and warm["cached_tokens"] == 50 and cold["cached_tokens"] == 0
    assert warm["ids"] == cold["ids"]
    assert len(worker.store.sessions) == 2  # the divergence lies before the answer: the original was copied
    compressed = make_worker(lm, small_policy("streaming"), tmp_path / "s")
    run_turn(compressed, prompt)
    assert run_turn(compressed, edited)["cached_tokens"] == 0  # a compressed cache cannot be cut: prefill anew


def test_sessions_never_cross_owners(lm: LoadedModel, tmp_path: Path) -> None:
    worker = make_worker(lm, registry.build("full"), tmp_path)
    prompt = list(range(20, 60))
    run_turn(worker, prompt, owner="alice")
    assert run_turn(worker, [*prompt, 1, 2], owner="bob")["cached_tokens"] == 0
    assert run_turn(worker, [*prompt, 1, 2], owner="alice")["cached_tokens"] == len(prompt)


def test_corrupt_file_fails_that_session_only(lm: LoadedModel, tmp_path: Path) -> None:
    policy = registry.build("full")
    worker = make_worker(lm, policy, tmp_path)
    a, b = list(range(10, 50)), list(range(100, 140))
    a += run_turn(worker, a)["ids"]
    b += run_turn(worker, b)["ids"]
    session_a = next(s for s in worker.store.sessions.values() if s.tokens[0] == 10)
    path = tmp_path / f"{session_a.id}{SUFFIX}"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    restarted = make_worker(lm, policy, tmp_path)
    with pytest.raises(ApiError) as failure:
        run_turn(restarted, [*a, 1])  # _run raises; the worker thread turns it into a 409 event
    assert failure.value.status == 409 and failure.value.code == "session_unavailable"
    assert (tmp_path / f"{session_a.id}{SUFFIX}.corrupt").exists()
    assert run_turn(restarted, [*b, 1])["cached_tokens"] == len(b) - 1  # the other session is intact
    assert run_turn(restarted, [*a, 1])["cached_tokens"] == 0  # retry: starts over


def test_disk_limit_drops_oldest_with_a_record(lm: LoadedModel, tmp_path: Path) -> None:
    worker = make_worker(lm, registry.build("full"), tmp_path, kv_memory=1)
    run_turn(worker, list(range(10, 60)))
    one = sum(s.file_bytes for s in worker.store.sessions.values())
    worker.store.disk_limit = int(one * 1.5)
    run_turn(worker, list(range(100, 150)))
    assert len(worker.store.sessions) == 1 and worker.store.stats().dropped == 1
    record = (tmp_path / "dropped.jsonl").read_text()
    assert "disk limit" in record and len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1


def test_state_refuses_what_it_cannot_write(lm: LoadedModel) -> None:
    cache = TierCache(lm.model, registry.build("full"))
    cache.tier_layers[0].handle = object()
    with pytest.raises(StateError, match=r"L0\.handle"):
        cache_state(cache)


def test_chat_turn_reuses_history_and_matches_a_cold_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Token-identical with the model's forward as the decode step. The fused step (the default) writes the answer's
    KV rows with other roundings than a cold server's prefill, so there the answers agree only to bf16 rounding."""
    chat_model_dir = with_role_template(tiny_model_dir, tmp_path / "model")
    messages = [{"role": "user", "content": "The pass key is 4321. Remember it."}]
    with serving(chat_model_dir, tmp_path / "warm", "--decode-step", "python") as warm:
        first = warm.client().chat.completions.create(model=warm.model, **ask(messages))
        history = [*messages, {"role": "assistant", "content": first.choices[0].message.content or ""}]
        history.append({"role": "user", "content": "What is the pass key?"})
        second = warm.client().chat.completions.create(model=warm.model, **ask(history))
    with serving(chat_model_dir, tmp_path / "cold", "--decode-step", "python") as cold:
        fresh = cold.client().chat.completions.create(model=cold.model, **ask(history))
    assert first.usage is not None and second.usage is not None and fresh.usage is not None
    assert second.usage.prompt_tokens_details is not None and fresh.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].model_extra["token_ids"] == fresh.choices[0].model_extra["token_ids"]


def _start(model_dir: Path, sessions: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tiermem.cli", "serve", "--model", str(model_dir)]
    command += ["--sessions-dir", str(sessions), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else "server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start in 120 s")


def test_kill_9_and_restart_keeps_completed_turns(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    process = _start(tiny_model_dir, tmp_path, port)
    model = str(tiny_model_dir)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        prompt = list(range(30, 90))
        first = client.completions.create(
            model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert first.choices[0].model_extra is not None
    ids = first.choices[0].model_extra["token_ids"]
    held = len(prompt) + len(ids) - (1 if first.choices[0].finish_reason == "length" else 0)
    port = free_port()
    process = _start(tiny_model_dir, tmp_path, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        second = client.completions.create(model=model, prompt=[*prompt, *ids, 7, 8], max_tokens=2, temperature=0)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == held
    assert "tiermem_sessions_restored_total 1" in metrics
    assert not np.any([p.name.endswith(".tmp") for p in tmp_path.iterdir()])


def test_a_restart_removes_stale_temporaries_only(lm: LoadedModel, tmp_path: Path) -> None:
    stale, fresh = tmp_path / f".old{SUFFIX}.tmp", tmp_path / f".new{SUFFIX}.tmp"
    stale.write_bytes(b"half a session")  # what a kill -9 during a write leaves
    fresh.write_bytes(b"a write in progress")  # another server sharing the folder may be writing this one
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    make_worker(lm, registry.build("full"), tmp_path)
    assert not stale.exists() and fresh.exists()
