"""Fault tolerance of tiermem serve: a turn that fails midway, a scaled-down fuzz of interleaved sessions with
restarts, and kill -9 under load (``benchmarks/serve_fault.py``, run as a subprocess on the tiny model)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_serve_sessions import job_events, make_worker
from tiermem.attention import patched_attention
from tiermem.memory import registry
from tiermem.models import LoadedModel, load
from tiermem.serve import worker as worker_module
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load(str(tiny_model_dir))


def loop_turn(worker: ModelWorker, prompt: list[int], max_tokens: int = 6) -> dict[str, Any]:
    """One greedy turn the way the worker's loop runs it (admit, then batched steps), errors caught as the loop
    catches them; returns the start, done and error events."""
    loop = asyncio.new_event_loop()
    try:
        job = Job(Turn("", max_tokens, 0.0, 1.0, 0, prompt=prompt), loop)
        with torch.inference_mode(), patched_attention(worker.lm.model):
            worker._admit(job)
            while worker.running:
                worker._step()
        return job_events(loop, job)
    finally:
        loop.close()


def fail_once(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make the worker's ``name`` (``prefill`` or ``decode_step``) raise on its next call only, as an out-of-memory
    error would."""
    real = getattr(worker_module, name)
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, name, flaky)


@pytest.mark.parametrize("where", ["decode_step", "prefill"])
def test_a_failed_turn_leaves_its_session_as_the_file_has_it(
    lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A turn that fails midway (decoding, or prefilling after the session was cut back to a prefix) is retried:
    the retry must be served from the session as its file holds it, so it answers what a cold server answers."""
    policy = registry.build("full")
    worker = make_worker(lm, policy, tmp_path / "w")
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 300, (40,), generator=gen).tolist()
    first = loop_turn(worker, prompt)
    held = len(prompt) + len(first["ids"]) - 1
    if where == "decode_step":  # a continuation: the new message is prefilled, then decoding fails
        retry = [*prompt, *first["ids"], *torch.randint(3, 300, (20,), generator=gen).tolist()]
    else:  # diverges inside the last answer: the session is truncated in place, then its prefill fails
        retry = [*prompt, *first["ids"][:2], *torch.randint(3, 300, (20,), generator=gen).tolist()]
    fail_once(monkeypatch, where)
    assert "error" in loop_turn(worker, retry)
    again = loop_turn(worker, retry)
    cold = loop_turn(make_worker(lm, policy, tmp_path / "cold"), retry)
    assert "error" not in again and again["ids"] == cold["ids"]
    assert again["cached_tokens"] <= min(held, len(retry) - 1)


def run_bench(*args: str, out: Path) -> dict[str, Any]:
    """``benchmarks/serve_fault.py`` run in this process (its in-process servers start in seconds)."""
    spec = importlib.util.spec_from_file_location("serve_fault", ROOT / "benchmarks" / "serve_fault.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([*args, "--in-process", "--out", str(out)]) == 0
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return dict(result)


def test_fuzz_of_interleaved_sessions_with_restarts(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Sessions of 3 owners with forks, edits and a same-prompt-other-owner start, spilled and restored, a graceful
    restart and a crash (no exit-time writes) between requests: every answer equals a stateless server's, every
    cached_tokens the client-side model's."""
    result = run_bench(
        "fuzz", "--model", str(tiny_model_dir), "--sessions", "16", "--requests", "40", "--owners", "3",
        "--restarts", "2", "--kv-memory", "64KB", out=tmp_path,
    )  # fmt: skip
    assert result["checked"] == 40 and result["errors"] == 0 and result["tracebacks"] == 0
    assert result["mismatches"] == 0 and result["cached_mismatches"] == 0
    assert result["cached_tokens_total"] > 0 and result["server_counters"]["sessions_restored"] > 0
    assert result["restarts"] == {"term": 1, "kill": 1} and set(result["operations"]) >= {"new", "continue", "edit"}
    assert not result["folder"]["tmp_files"] and not result["folder"]["unreadable"]


def test_kill_9_under_load_keeps_every_completed_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    """4 concurrent conversations; a real SIGKILL of the server process with turns in flight, a restart: the turns
    in flight are retried and every conversation's next turn is served from its whole completed history."""
    result = run_bench(
        "killrun", "--model", str(tiny_model_dir), "--clients", "4", "--turns", "4", out=tmp_path
    )  # fmt: skip
    assert result["completed_turns"] == 16 and result["http_errors"] == 0 and result["tracebacks"] == 0
    assert result["in_flight_at_kill"] and result["in_flight_at_kill"][0] > 0
    assert result["first_turns_after_kill"] > 0
    assert result["first_turns_after_kill_fully_cached"] == result["first_turns_after_kill"]
    assert result["turns_short_of_history"] == 0 and result["content_mismatches"] == 0
    assert not result["folder"]["tmp_files"] and not result["folder"]["unreadable"]
