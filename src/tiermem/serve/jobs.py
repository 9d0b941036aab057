"""Async glue between an endpoint and the model worker: submit a turn, await its events, cancel it when the
client goes away."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from tiermem.serve.schemas import ApiError
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker, Overloaded, ShuttingDown

DISCONNECT_POLL_S = 0.5


async def submit(worker: ModelWorker, turn: Turn, request: Request) -> tuple[Job, dict[str, Any]]:
    """Queue ``turn`` and wait until it starts; returns the job and its ``start`` event (tokens, cached, session).
    A full queue is a 429 and a server shutting down a 503, both with ``Retry-After``."""
    job = Job(turn, asyncio.get_running_loop())
    try:
        worker.submit(job)
    except Overloaded:
        raise ApiError(
            429, "the server is busy: too many queued requests", kind="rate_limit_error", headers={"Retry-After": "1"}
        ) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "5"}) from None
    kind, start = await next_event(job, request)
    if kind == "error":
        raise start
    return job, start


async def next_event(job: Job, request: Request) -> tuple[str, Any]:
    """The job's next event; a client that went away cancels the job (its slot is freed at once)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise ApiError(499, "client closed the request") from None
        except asyncio.CancelledError:
            job.cancelled.set()
            raise


async def collect(job: Job, request: Request) -> dict[str, Any]:
    """Wait for the job's ``done`` event (text pieces are already in it)."""
    while True:
        kind, data = await next_event(job, request)
        if kind == "error":
            raise data
        if kind == "done":
            return dict(data)
