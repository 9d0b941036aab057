"""``/v1/responses``: OpenAI's stateful endpoint. ``previous_response_id`` continues a stored conversation.

A stored response keeps the conversation as messages (its input, the inputs of the responses before it, and its
output), in RAM and appended to ``responses.jsonl`` in the sessions folder (fsynced when durable), so a chain of
responses survives a restart. The KV state itself is not tied to a response: the continued conversation renders to
token ids that start with the stored session's, and prefix matching finds it, so ``cached_tokens`` is reported as
for chat completions. ``instructions`` are not carried over to the next response, as in OpenAI's API.

Not implemented (400 when given): tools, ``truncation="auto"``, background mode. The store keeps every response
until deleted (``DELETE /v1/responses/{id}``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tiermem.serve.jobs import collect, submit
from tiermem.serve.schemas import ApiError
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker

RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")


class InputPart(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputPart]

    def as_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputMessage]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    truncation: Literal["disabled", "auto"] | None = None
    tools: list[Any] | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [item.as_message() for item in self.input]


class ResponseStore:
    """Stored responses by id, each with its owner and its conversation; an append-only JSON-lines file."""

    def __init__(self, folder: Path, durable: bool = True):
        self.path = folder / "responses.jsonl"
        self.durable = durable
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash: the responses before it are intact
                if record.get("deleted"):
                    self.records.pop(record["id"], None)
                elif isinstance(record, dict) and "id" in record:
                    self.records[record["id"]] = record

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock, self.path.open("a") as handle:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
            if self.durable:
                handle.flush()
                os.fsync(handle.fileno())

    def put(self, record: dict[str, Any]) -> None:
        self._append(record)
        self.records[record["id"]] = record

    def get(self, owner: str, ident: str) -> dict[str, Any]:
        """The record of ``ident`` if ``owner`` made it; a malformed id is a 400, another owner's a 404."""
        if not RESPONSE_ID.fullmatch(ident):
            raise ApiError(400, "a response id is 'resp_' and 32 hex digits", param="response_id")
        record = self.records.get(ident)
        if record is None or record["owner"] != owner:
            raise ApiError(404, f"response '{ident}' not found", param="response_id", code="not_found")
        return record

    def delete(self, owner: str, ident: str) -> None:
        self.get(owner, ident)
        self._append({"id": ident, "deleted": True})
        self.records.pop(ident, None)


def _usage(start: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
    prompt, output = start["prompt_tokens"], done["completion_tokens"]
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": start["cached_tokens"]},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _response(ident: str, body: ResponseRequest, text: str | None, done: dict[str, Any] | None) -> dict[str, Any]:
    """The ``response`` object; ``done=None`` while in progress."""
    message: dict[str, Any] = {"type": "message", "id": f"msg_{ident[5:]}", "role": "assistant"}
    status = "in_progress"
    incomplete = None
    if done is not None:
        status = "incomplete" if done["finish_reason"] in ("length", "cancelled") else "completed"
        if done["finish_reason"] == "length":
            incomplete = {"reason": "max_output_tokens"}
    message["status"] = status
    message["content"] = [{"type": "output_text", "text": text, "annotations": []}] if text is not None else []
    return {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": body.model,
        "output": [message] if done is not None else [],
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "error": None,
        "incomplete_details": incomplete,
        "metadata": body.metadata or {},
        "usage": None,
    }


def register(app: FastAPI, worker: ModelWorker, model_id: str, store: ResponseStore) -> None:
    @app.post("/v1/responses", response_model=None)
    async def create(body: ResponseRequest, request: Request) -> Response:
        owner = request.state.owner
        if body.model != model_id:
            raise ApiError(404, f"the model '{body.model}' does not exist", param="model", code="model_not_found")
        for name in ("tools", "background"):
            if getattr(body, name):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)
        if body.truncation == "auto":
            raise ApiError(400, "truncation 'auto' is not supported: use 'disabled'", param="truncation")
        history: list[dict[str, str]] = []
        if body.previous_response_id is not None:
            history = list(store.get(owner, body.previous_response_id)["messages"])
        conversation = history + body.messages()
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        turn = Turn(owner, body.max_output_tokens, body.temperature, body.top_p, seed, messages=system + conversation)
        job, start = await submit(worker, turn, request)
        ident = f"resp_{secrets.token_hex(16)}"
        headers = {"x-tiermem-session": start["session"]}

        def finish(done: dict[str, Any]) -> dict[str, Any]:
            response = _response(ident, body, done["text"], done)
            response["usage"] = _usage(start, done)
            if body.store:
                record = {"id": ident, "owner": owner, "response": response}
                record["messages"] = [*conversation, {"role": "assistant", "content": done["text"]}]
                store.put(record)
            return response

        if body.stream:
            events = _events(job, request, ident, body, finish)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return JSONResponse(finish(await collect(job, request)), headers=headers)

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request) -> dict[str, Any]:
        return dict(store.get(request.state.owner, response_id)["response"])

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request) -> dict[str, Any]:
        store.delete(request.state.owner, response_id)
        return {"id": response_id, "object": "response", "deleted": True}


async def _events(job: Job, request: Request, ident: str, body: ResponseRequest, finish: Any) -> AsyncIterator[bytes]:
    """The Responses API's typed SSE events, from ``response.created`` to ``response.completed``."""
    sequence = 0
    item = f"msg_{ident[5:]}"

    def event(kind: str, **data: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        payload = {"type": kind, "sequence_number": sequence, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    where = {"item_id": item, "output_index": 0, "content_index": 0}
    finished = False
    try:
        yield event("response.created", response=_response(ident, body, None, None))
        message = {"type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []}
        yield event("response.output_item.added", output_index=0, item=message)
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
        while True:
            kind, data = await job.events.get()
            if kind == "text":
                yield event("response.output_text.delta", **where, delta=data, logprobs=[])
            elif kind == "error":
                yield event("error", code=data.code, message=data.message, param=None)
                break
            else:
                response = finish(data)
                text = data["text"]
                yield event("response.output_text.done", **where, text=text, logprobs=[])
                part = {"type": "output_text", "text": text, "annotations": []}
                yield event("response.content_part.done", **where, part=part)
                yield event("response.output_item.done", output_index=0, item=response["output"][0])
                done_kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
                yield event(done_kind, response=response)
                break
        finished = True
    finally:
        if not finished:
            job.cancelled.set()
