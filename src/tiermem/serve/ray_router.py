"""The Ray Serve side of ``tiermem serve --ray`` (see :mod:`tiermem.serve.ray_serve` for the layout): the
session-affinity request router, the replica that runs the whole server as an ASGI app, and the ingress.

Imports Ray at module level: import it only after :func:`tiermem.raycluster.connect`. No ``from __future__ import
annotations`` here: Serve's ingress rewrites the route's signature, and FastAPI must see ``Request`` as a class.
"""

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from tiermem.serve.ray_serve import affinity_key, rendezvous

log = logging.getLogger("tiermem.serve")
REPLICA_HEADER = "x-tiermem-replica"
RETRY_SECONDS = 60.0  # how long the ingress retries a request whose replica died before answering
HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}


class SessionAffinityRouter(RequestRouter):
    """Ray Serve request router: a request whose first argument is an affinity key goes to the live replica with
    the highest :func:`rendezvous` weight (and waits for it when it is full, rather than landing elsewhere and
    prefilling the whole conversation again); a request without a key goes to the least loaded replica."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if not isinstance(key, str) or not candidate_replicas:
            return [candidate_replicas]
        best = max(candidate_replicas, key=lambda r: rendezvous(key, r.replica_id.unique_id))
        return [[best]]


class TiermemReplica:
    """One whole ``tiermem serve`` (model, worker, shared session store, every route), called through
    :meth:`forward` with a raw HTTP request and answering with the ASGI messages' content: first a dict (status
    and headers), then body chunks as the app sends them (so SSE streams through)."""

    def __init__(self, args: argparse.Namespace):
        from tiermem.serve.cli import build
        from tiermem.serve.shared_sessions import SharedResponseStore, SharedSessionStore

        self.app = build(args, session_store=SharedSessionStore, response_store=SharedResponseStore)
        self.name = serve.get_replica_context().replica_id.unique_id
        self._lifespan: asyncio.Queue[dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        """Run the app's lifespan startup (the model worker's thread) once, on the replica's event loop."""
        async with self._lock:
            if self._lifespan is not None:
                return
            inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            started = asyncio.get_running_loop().create_future()

            async def send(message: dict[str, Any]) -> None:
                if message["type"].startswith("lifespan.startup") and not started.done():
                    started.set_result(message)

            self._task = asyncio.create_task(
                self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
            )
            await inbox.put({"type": "lifespan.startup"})
            message = await started
            if message["type"] != "lifespan.startup.complete":
                raise RuntimeError(f"the server did not start: {message.get('message', '')}")
            self._lifespan = inbox

    async def forward(
        self, key: str | None, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[Any]:
        """One HTTP request through the app. ``key`` is read by :class:`SessionAffinityRouter` only."""
        await self._start()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query,
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the app asks again only to learn of a disconnect
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await outbox.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await outbox.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await outbox.get()) is not None:
                if message["type"] == "http.response.start":
                    extra = [(REPLICA_HEADER.encode(), self.name.encode())]
                    yield {"status": message["status"], "headers": list(message.get("headers", [])) + extra}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:
            gone.set()  # the caller went away (or the body ended): a streaming turn stops at its next token
            await task


ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


# The ingress only waits on replicas: Serve's default of 5 requests at once would queue conversations at the proxy.
@serve.deployment(name="TiermemIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(ingress_app)  # at import: Ray pickles the class by reference, so replicas import it decorated
class TiermemIngress:
    """Serve's HTTP entry: every path and method, forwarded to the replica the request's affinity key picks.
    A replica that dies before answering is retried (the router drops it; the conversation's next replica restores
    the session from the shared folder) for up to :data:`RETRY_SECONDS`."""

    def __init__(self, replicas: DeploymentHandle):
        self.replicas = replicas.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def proxy(self, path: str, request: Request) -> Response:
        body = await request.body()
        key = affinity_key(request.url.path, request.headers, body)
        headers = [(k.lower(), v) for k, v in request.headers.raw]
        call = (key, request.method, request.url.path, request.url.query.encode(), headers, body)
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            stream: Any = self.replicas.forward.remote(*call)  # a DeploymentResponseGenerator (stream=True)
            try:
                head = await stream.__anext__()
                break
            except (RayActorError, ActorUnavailableError) as exc:
                if time.monotonic() > deadline:
                    message = f"no replica answered in {RETRY_SECONDS:.0f} s: {type(exc).__name__}"
                    body_ = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
                    return JSONResponse(body_, status_code=503)
                log.warning("replica unavailable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.5)
        kept = {k.decode(): v.decode() for k, v in head["headers"] if k.decode().lower() not in HOP_HEADERS}

        async def rest() -> AsyncIterator[bytes]:
            async for chunk in stream:
                yield chunk

        return StreamingResponse(rest(), status_code=head["status"], headers=kept)


def application(args: argparse.Namespace, memory: int) -> Any:
    """The bound Serve application: the ingress over ``args.replicas`` replicas of ``memory`` bytes each."""
    replica: Any = serve.deployment(
        TiermemReplica,
        name="TiermemReplica",
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_queue + args.max_batch,  # beyond that the worker answers 429 itself
        ray_actor_options={"num_cpus": args.replica_cpus, "memory": memory},
        request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),  # type: ignore[arg-type]
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    ingress: Any = TiermemIngress  # a Deployment once decorated (mypy sees the class)
    return ingress.bind(replica.bind(args))
