"""``tiermem serve --ray``: the server as Ray Serve replicas, each conversation pinned to one replica.

Layout (Ray Serve deployments, :mod:`tiermem.serve.ray_router`):

- ``TiermemIngress`` (0 CPUs): Serve's HTTP proxy hands it every request; it reads the body, computes the
  request's affinity key (:func:`affinity_key`) and forwards the raw request to the replicas' handle;
- ``TiermemReplica`` x N: each one is the whole single-process server (model, batching worker, session store, all
  routes) driven as an ASGI app; its session store is shared through ``--sessions-dir``
  (:mod:`tiermem.serve.shared_sessions`), written after every turn (``--durable``, the default);
- ``SessionAffinityRouter``: the replicas' request router (Ray Serve's own extension point for routing): the
  replica with the highest rendezvous hash of (key, replica id) takes the request. Rendezvous hashing is
  consistent: when a replica leaves, only its conversations move; a new replica takes about 1/N of them. A moved
  conversation loses nothing: its next turn restores its session from the shared folder.

The affinity key, first that applies: OpenAI's ``prompt_cache_key`` field (its own routing hint for prefix caching);
the conversation's start: the leading system or developer messages and the first user message of a chat, the
first ``PREFIX_CHARS`` characters (or ``PREFIX_TOKENS`` token ids) of a completion's prompt, a response's
``instructions`` and first input message; then the API key's hash, so two users' conversations hash apart. A
request with nothing to key on (health, metrics, a ``previous_response_id`` alone) goes to the least loaded replica.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from tiermem.errors import TiermemError

PREFIX_CHARS = 256
PREFIX_TOKENS = 64
log = logging.getLogger("tiermem.serve")


def add_ray_args(serve: argparse.ArgumentParser) -> None:
    """The ``--ray`` flags of ``tiermem serve``."""
    serve.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run as Ray Serve replicas on the cluster at ADDRESS (host:port, auto); alone: a local Ray",
    )
    serve.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (with --ray; default 2)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (with --ray; default 1)")


def _conversation_start(path: str, body: dict[str, Any]) -> Any:
    """What stays the same across the turns of one conversation, for each endpoint (None: nothing)."""
    if path.endswith("/chat/completions"):
        start = []
        for message in body.get("messages") or []:
            if not isinstance(message, dict):
                return None
            start.append([message.get("role"), message.get("content")])
            if message.get("role") == "user":
                return start
        return start or None
    if path.endswith("/completions"):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return prompt[:PREFIX_CHARS]
        if isinstance(prompt, list):
            return prompt[:PREFIX_TOKENS]
        return None
    if path.endswith("/responses"):
        given = body.get("input")
        first = given[0] if isinstance(given, list) and given else given
        return [body.get("instructions"), first] if first is not None else None
    return None


def affinity_key(path: str, headers: Mapping[str, str], body: bytes) -> str | None:
    """The key that pins a request's conversation to a replica (see the module docstring); None: any replica."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    given = parsed.get("prompt_cache_key")
    start: Any = given if isinstance(given, str) and given else _conversation_start(path, parsed)
    if start is None:
        return None
    owner = hashlib.sha256(headers.get("authorization", "").encode()).hexdigest()[:16]
    text = json.dumps([owner, start], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def rendezvous(key: str, replica: str) -> int:
    """Highest-random-weight hashing: each (key, replica) pair gets a pseudo-random weight; the key goes to the
    replica with the largest, so removing a replica moves only the keys it held."""
    return int.from_bytes(hashlib.sha256(f"{key}\x00{replica}".encode()).digest()[:8], "big")


def replica_memory(args: argparse.Namespace) -> int:
    """Bytes one replica needs by the planner's model: the process and the weights resident, plus ``--kv-memory``
    (the RAM all its sessions' KV may take; without it, one full-context session). Ray places replicas by it."""
    from transformers import AutoConfig

    from tiermem.models import DTYPES, resolve_source
    from tiermem.plan.cost import Shapes
    from tiermem.stats import current_rss_bytes

    shapes = Shapes.from_config(
        AutoConfig.from_pretrained(str(resolve_source(args.model)), local_files_only=True),
        dtype_bytes=DTYPES[args.dtype].itemsize,
    )
    kv = args.kv_memory if args.kv_memory else shapes.max_positions * shapes.kv_bytes_per_token
    return int(current_rss_bytes() + shapes.weight_bytes + kv)


def check(args: argparse.Namespace) -> None:
    if args.replicas < 1:
        raise TiermemError("--replicas must be at least 1")
    if args.replica_cpus <= 0:
        raise TiermemError("--replica-cpus must be positive")
    if not args.durable:
        raise TiermemError("--ray needs --durable: a replica that dies must leave every completed turn on disk")
    if not args.sessions_dir:
        raise TiermemError("--ray needs --sessions-dir: a folder every replica reads and writes (shared storage)")


def start(args: argparse.Namespace) -> str:
    """Deploy the ingress and ``args.replicas`` replicas on the connected Ray cluster; returns the HTTP URL.

    Ray must be connected (:func:`tiermem.raycluster.connect`) before this imports it."""
    from ray import serve

    from tiermem.serve.ray_router import application

    serve.start(http_options={"host": args.host, "port": args.port}, detached=False)
    serve.run(application(args, replica_memory(args)), name="tiermem", route_prefix="/", blocking=False)
    return f"http://{args.host}:{args.port}"


def cmd_serve_ray(args: argparse.Namespace) -> int:
    """``tiermem serve --ray``: start the replicas and wait for Ctrl-C."""
    from tiermem.raycluster import connect, disconnect

    check(args)
    if not args.api_key and os.environ.get("TIERMEM_API_KEY"):
        args.api_key = [os.environ["TIERMEM_API_KEY"]]
    cluster = connect(args.ray or None, num_cpus=max(2, int(args.replicas * args.replica_cpus + 0.999)))
    try:
        url = start(args)
        print(f"tiermem serve: {args.replicas} Ray Serve replicas at {url} (Ray at {cluster.address}); Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        from ray import serve

        serve.shutdown()
        disconnect(cluster)
