"""Under ``--kv-memory`` the worker admits a turn only while its KV fits beside the running turns' KV."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.test_serve_sessions import make_worker
from tiermem.layer_info import describe_layers
from tiermem.memory import registry
from tiermem.models import LoadedModel, load
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker

PROMPT, NEW, TURNS = 60, 8, 4


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load(str(tiny_model_dir))


def run_together(worker: ModelWorker) -> tuple[list[int], list[int], list[str]]:
    """Submit ``TURNS`` turns at once to the running loop; per decode step, the turns running and their KV bytes;
    and how each turn ended."""
    sizes: list[int] = []
    held: list[int] = []
    step = worker._step

    def spy() -> None:
        sizes.append(len(worker.running))
        held.append(sum(t.session.ram_bytes() for t in worker.running))
        step()

    worker._step = spy  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    jobs = [
        Job(Turn(f"k{i}", NEW, 0.0, 1.0, 0, ignore_eos=True, prompt=[10 + i + j for j in range(PROMPT)]), loop)
        for i in range(TURNS)
    ]
    worker.start()
    for job in jobs:
        worker.submit(job)

    async def ends() -> list[str]:
        out = []
        for job in jobs:
            while True:
                kind, data = await job.events.get()
                if kind in ("done", "error"):
                    out.append(kind if kind == "error" else data["finish_reason"])
                    break
        return out

    finished = loop.run_until_complete(ends())
    worker.stop()
    loop.close()
    return sizes, held, finished


def test_turns_wait_for_room_under_the_limit(lm: LoadedModel, tmp_path: Path) -> None:
    per_token = sum(info.kv_bytes_per_token() for info in describe_layers(lm.model))
    one_turn = (PROMPT + NEW) * per_token
    limit = int(2.5 * one_turn)  # two turns fit together, three do not
    free, _, finished = run_together(make_worker(lm, registry.build("full"), tmp_path / "a"))
    assert max(free) == TURNS and finished == ["length"] * TURNS  # the control: without a limit all run at once
    sizes, held, finished = run_together(make_worker(lm, registry.build("full"), tmp_path / "b", kv_memory=limit))
    assert finished == ["length"] * TURNS  # every turn ran to its end
    assert max(sizes) == 2  # two at once: batching is kept where the limit allows it
    assert max(held) <= limit


def test_a_turn_larger_than_the_limit_still_runs_alone(lm: LoadedModel, tmp_path: Path) -> None:
    sizes, _, finished = run_together(make_worker(lm, registry.build("full"), tmp_path, kv_memory=1))
    assert finished == ["length"] * TURNS and max(sizes) == 1
