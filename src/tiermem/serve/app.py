"""The HTTP routes: OpenAI-compatible chat and text completions (streamed over SSE or not), models, health and
Prometheus metrics. Every error is OpenAI-shaped JSON; no request can show a traceback or stop the server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tiermem.serve.jobs import collect, submit
from tiermem.serve.metrics import Metrics
from tiermem.serve.page import PAGE
from tiermem.serve.responses import ResponseStore
from tiermem.serve.responses import register as register_responses
from tiermem.serve.schemas import ApiError, ChatRequest, CompletionRequest, Sampling
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker

log = logging.getLogger("tiermem.serve")
OPEN_PATHS = ("/health", "/")
MAX_BODY_BYTES = 16 * 2**20


@dataclass
class ServeOptions:
    model_id: str
    api_keys: tuple[str, ...] = ()


def owner_of(key: str) -> str:
    """Sessions belong to a hash of the API key that made them (never the key itself: it is on disk)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    return f"invalid value for '{param}': {first.get('msg', 'invalid')}" if param else str(first.get("msg")), param


def create_app(
    worker: ModelWorker, metrics: Metrics, options: ServeOptions, responses: ResponseStore | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="tiermem", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    keys = {k: owner_of(k) for k in options.api_keys}

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            request.state.owner = _authenticate(request, keys) if path not in OPEN_PATHS else ""
            response = await call_next(request)
        except ApiError as exc:
            response = exc.response()
        except ValueError:
            response = ApiError(400, "bad Content-Length header").response()
        metrics.request(path if path in KNOWN_PATHS else "other", response.status_code)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": options.model_id, "queue": worker.depth}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/tiermem/status")
    async def status(request: Request) -> dict[str, Any]:
        stats = worker.store.stats()
        return {
            "model": options.model_id,
            "policy": repr(worker.policy),
            "kv_memory": worker.store.kv_memory,
            "sessions_disk": worker.store.disk_limit,
            "sessions": stats.sessions,
            "bytes": stats.bytes,
            "queue": worker.depth,
            "yours": worker.store.owned(request.state.owner),
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render(worker.store.stats(), worker.depth)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": options.model_id, "object": "model", "created": STARTED, "owned_by": "tiermem"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        turn = _turn(body, body.limit(), request, options, messages=messages)
        return await _answer(worker, body, turn, request, chat=True, model_id=options.model_id)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        for name in ("echo", "suffix"):
            if getattr(body, name):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)
        try:
            prompt = body.single_prompt()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        turn = _turn(body, body.limit(), request, options, prompt=prompt)
        return await _answer(worker, body, turn, request, chat=False, model_id=options.model_id)

    register_responses(app, worker, options.model_id, responses or ResponseStore(worker.store.folder))
    return app


STARTED = int(time.time())
KNOWN_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/tiermem/status",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
)


def _authenticate(request: Request, keys: dict[str, str]) -> str:
    """The owner id of the request's Bearer key (constant-time compare against every key), "" without keys."""
    if not keys:
        return ""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    found = ""
    for key, owner in keys.items():  # compare against all keys, so timing does not tell which prefix matched
        if hmac.compare_digest(given.strip().encode(), key.encode()) and scheme.lower() == "bearer":
            found = owner
    if not found:
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
    return found


def _turn(body: Sampling, limit: int | None, request: Request, options: ServeOptions, **prompt: Any) -> Turn:
    if body.model != options.model_id:
        raise ApiError(404, f"the model '{body.model}' does not exist", param="model", code="model_not_found")
    if (name := body.unsupported()) is not None:
        raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    return Turn(
        owner=request.state.owner,
        max_tokens=limit,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=seed,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
        **prompt,
    )


async def _answer(
    worker: ModelWorker, body: Sampling, turn: Turn, request: Request, chat: bool, model_id: str
) -> Response:
    job, start = await submit(worker, turn, request)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    headers = {"x-tiermem-session": start["session"]}
    shape = _Shape(ident, model_id, chat, start, body.return_token_ids)
    if body.stream:
        return StreamingResponse(
            _sse(job, request, shape, body.include_usage()), media_type="text/event-stream", headers=headers
        )
    return JSONResponse(shape.whole(await collect(job, request)), headers=headers)


class _Shape:
    """OpenAI response objects for one request: whole (``chat.completion``, ``text_completion``) or chunks."""

    def __init__(self, ident: str, model: str, chat: bool, start: dict[str, Any], token_ids: bool = False):
        self.ident, self.model, self.chat, self.start = ident, model, chat, start
        self.token_ids = token_ids
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, done: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = self.start["prompt_tokens"], done["completion_tokens"]
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.start["cached_tokens"]},
        }

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, done: dict[str, Any]) -> dict[str, Any]:
        finish = "stop" if done["finish_reason"] == "cancelled" else done["finish_reason"]
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": done["text"]}}
        else:
            choice = {"index": 0, "text": done["text"]}
        choice.update({"finish_reason": finish, "logprobs": None})
        if self.token_ids:
            choice["token_ids"] = done["ids"]
        return {**self._envelope(self.object, [choice]), "usage": self.usage(done)}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._envelope("text_completion", [choice])


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _sse(job: Job, request: Request, shape: _Shape, include_usage: bool) -> AsyncIterator[bytes]:
    finished = False
    try:
        if shape.chat:
            yield _event(shape.chunk(None, first=True))
        while True:
            kind, data = await job.events.get()
            if kind == "text":
                yield _event(shape.chunk(data))
            elif kind == "error":  # headers are sent: report in-band, as OpenAI's streams do
                body = {"error": {"message": data.message, "type": data.kind, "param": None, "code": data.code}}
                yield _event(body)
                break
            else:
                yield _event(
                    shape.chunk(None, finish="stop" if data["finish_reason"] == "cancelled" else data["finish_reason"])
                )
                if include_usage:
                    yield _event({**shape._envelope(shape.chunk(None)["object"], []), "usage": shape.usage(data)})
                break
        finished = True
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            job.cancelled.set()  # the client went away mid-stream: stop decoding at the next token
