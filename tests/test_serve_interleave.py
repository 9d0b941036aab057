"""Chunked prefill in the server's worker: a long prompt is read one chunk per step while running answers go on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.test_serve_sessions import job_events, make_worker
from tiermem.attention import patched_attention
from tiermem.memory import registry
from tiermem.models import LoadedModel, load
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker

CHUNK, LONG, NEW = 16, 160, 40


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load(str(tiny_model_dir))


def _job(loop: asyncio.AbstractEventLoop, owner: str, prompt: list[int], new: int) -> Job:
    return Job(Turn(owner, new, 0.0, 1.0, 0, ignore_eos=True, prompt=prompt), loop)


def _worker(lm: LoadedModel, folder: Path, decode_per_chunk: int = 1) -> ModelWorker:
    worker = make_worker(lm, registry.build("full"), folder)
    worker.chunk_size, worker.decode_per_chunk = CHUNK, decode_per_chunk
    return worker


@contextmanager
def _as_the_loop(lm: LoadedModel) -> Iterator[None]:
    """What the worker's thread runs its steps under."""
    with torch.inference_mode(), patched_attention(lm.model):
        yield


def _drain(worker: ModelWorker) -> None:
    while worker.running:
        worker._step()


@pytest.mark.parametrize("per_chunk", [1, 3])
def test_answers_go_on_while_a_long_prompt_is_read(lm: LoadedModel, tmp_path: Path, per_chunk: int) -> None:
    loop = asyncio.new_event_loop()
    with _as_the_loop(lm):
        long_prompt = [5 + (7 * i) % 200 for i in range(LONG)]
        alone = _worker(lm, tmp_path / "alone")
        solo = _job(loop, "b", long_prompt, 4)
        alone._admit(solo)
        _drain(alone)
        expected = job_events(loop, solo)

        worker = _worker(lm, tmp_path / "together", per_chunk)
        short = _job(loop, "a", [11, 12, 13, 14], NEW)
        worker._admit(short)
        worker._step()  # reads the short prompt and feeds its first token
        (answering,) = worker.running
        long = _job(loop, "b", long_prompt, 4)
        worker._admit(long)
        reading_steps, grown = 0, []
        while any(t.reading for t in worker.running):
            before = len(answering.ids)
            worker._step()
            reading_steps += 1
            grown.append(len(answering.ids) - before)
        assert reading_steps == LONG // CHUNK * per_chunk  # a chunk every `per_chunk` steps
        assert grown == [1] * reading_steps  # the running answer got a token at every one of them
        _drain(worker)
        together = job_events(loop, long)
        assert together["ids"] == expected["ids"] and together["prompt_tokens"] == LONG  # same answer as read alone
        assert job_events(loop, short)["completion_tokens"] == NEW
    loop.close()


def test_a_turn_cancelled_while_reading_leaves_no_half_read_session(lm: LoadedModel, tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    with _as_the_loop(lm):
        worker = _worker(lm, tmp_path)
        prompt = [5 + (3 * i) % 200 for i in range(LONG)]
        job = _job(loop, "c", prompt, 4)
        worker._admit(job)
        worker._step()
        worker._step()
        job.cancelled.set()
        _drain(worker)
        assert job_events(loop, job)["error"].status == 503
        again = _job(loop, "c", prompt, 4)  # the next turn of that conversation starts from nothing, and completes
        worker._admit(again)
        _drain(worker)
        events = job_events(loop, again)
        assert events["cached_tokens"] == 0 and events["completion_tokens"] == 4
    loop.close()
