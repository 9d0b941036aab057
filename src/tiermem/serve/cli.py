"""``tiermem serve``: its arguments, and building the server from them.

The model and policy flags are the ones ``tiermem generate`` takes (:mod:`tiermem.cli_args`), so ``--policy``
defaults to ``auto`` here too: each session gets the policy auto picks for its first prompt.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_PORT = 8000


def add_serve_parser(sub: Any) -> None:
    """Add the ``serve`` subcommand to the ``tiermem`` subparsers."""
    from tiermem.cli_args import add_model_args, add_policy_args
    from tiermem.decode_step import DECODE_STEPS
    from tiermem.units import parse_size, parse_tokens

    serve = sub.add_parser("serve", help="OpenAI-compatible server whose chat sessions keep their KV memory")
    add_model_args(serve)
    add_policy_args(serve, compressed="each turn's memory")
    serve.add_argument("--kv-memory", type=parse_size, help="KV bytes of all sessions in RAM, e.g. 2GB (rest on disk)")
    serve.add_argument("--sessions-dir", help="session files (default: the tiermem cache's sessions folder)")
    serve.add_argument("--sessions-disk", type=parse_size, help="bytes of session files kept at most, e.g. 20GB")
    durable = serve.add_mutually_exclusive_group()
    durable.add_argument("--durable", dest="durable", action="store_true", default=True, help="(default)")
    durable.add_argument(
        "--no-durable", dest="durable", action="store_false", help="write sessions only when spilled or at exit"
    )
    serve.add_argument(
        "--session-memory",
        default="on",
        choices=["on", "off"],
        help="off: every turn re-reads its whole prompt and nothing is kept (a baseline for benchmarks)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--api-key", action="append", default=[], help="accepted Bearer key (repeatable)")
    serve.add_argument("--served-model-name", help="model id clients send (default: --model)")
    serve.add_argument("--max-queue", type=int, default=16, help="turns queued before answering 429")
    serve.add_argument("--max-batch", type=int, default=8, help="turns decoded together in one forward")
    serve.add_argument("--max-tokens", type=parse_tokens, default=256, help="default max_tokens of a request")
    serve.add_argument("--chunk-size", type=parse_tokens, default=512, help="prefill chunk size in tokens")
    serve.add_argument(
        "--decode-per-chunk",
        type=int,
        default=4,
        help="while turns are answering, decode steps per prompt chunk read (1: a chunk every step)",
    )
    serve.add_argument(
        "--decode-step",
        default="auto",
        choices=list(DECODE_STEPS),
        help="auto: the fused decode step where the model and policy allow it (a turn served from session memory "
        "may then differ from a cold server's by bf16 rounding); python: the model's forward, token-identical",
    )
    from tiermem.serve.ray_serve import add_ray_args

    add_ray_args(serve)


T = TypeVar("T")


def off_main_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a short-lived thread: its result, or its exception raised here.

    The server's model work runs on the model thread (:class:`tiermem.serve.worker.ModelWorker`); what runs before
    it (the load, a policy's calibration) runs here, so that the main thread never starts OpenMP work. libgomp gives
    each thread that starts parallel work its own pool of threads, and with more pooled threads than cores it
    shortens their spin-waits: on 2 cores a decode GEMV took 100-124 us from a second thread's pool against 34 us
    from the only one (BENCHMARKS.md, "The fused decode step"). A pool ends with its thread, so the model thread's
    is then the only one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiermem-load") as pool:
        return pool.submit(fn, *args, **kwargs).result()


def build(args: argparse.Namespace, session_store: Any = None, response_store: Any = None) -> Any:
    """The FastAPI app for ``args`` (the model is loaded here); ``session_store`` and ``response_store`` replace
    the store classes (``--ray`` replicas share a folder: :mod:`tiermem.serve.shared_sessions`)."""
    from tiermem.cache import TierCache
    from tiermem.cli import make_policy
    from tiermem.cli_args import load_options
    from tiermem.errors import TiermemError
    from tiermem.kvstore.blocks import StoreConfig
    from tiermem.layer_info import describe_layers
    from tiermem.memory.base import Policy
    from tiermem.models import DTYPES, cache_root, load
    from tiermem.serve.app import ServeOptions, create_app
    from tiermem.serve.metrics import Metrics
    from tiermem.serve.policies import SessionPolicies
    from tiermem.serve.responses import ResponseStore
    from tiermem.serve.sessions import SessionStore
    from tiermem.serve.worker import ModelWorker
    from tiermem.weights.shards import source_fingerprint

    if args.max_queue < 1 or args.max_batch < 1 or args.decode_per_chunk < 1:
        raise TiermemError("--max-queue, --max-batch and --decode-per-chunk must be at least 1")
    if not 0 < args.port < 65536:
        raise TiermemError(f"--port must be in 1..65535, got {args.port}")
    policy = make_policy(args.policy, args.kv_budget, args.compression_ratio, args.policy_opt)
    lm = off_main_thread(load, args.model, **load_options(args))
    key = {"model": source_fingerprint(lm.source, DTYPES[args.dtype]), "policy": repr(policy), "dtype": args.dtype}
    if args.weights_quant != "none" or args.kv_dtype != "auto":  # a session never crosses number formats
        key |= {"weights": lm.weights_format, "kv_dtype": args.kv_dtype}
    folder = Path(args.sessions_dir) if args.sessions_dir else cache_root() / "sessions"
    if folder.exists() and not folder.is_dir():
        raise TiermemError(f"--sessions-dir '{folder}' is not a folder")

    def make_cache(policy: Policy) -> TierCache:
        return TierCache(lm.model, policy, StoreConfig(kv_dtype=args.kv_dtype), tokenizer=lm.tokenizer)

    policies = SessionPolicies(policy, describe_layers(lm.model, args.kv_dtype), args.kv_memory)
    if not policies.auto:  # a policy that cannot build a cache fails here, not at the first request
        off_main_thread(lambda: make_cache(policy).close())  # calibrating policies run the model
    store = (session_store or SessionStore)(
        folder, key, policies, make_cache, args.kv_memory, args.sessions_disk, args.durable
    )
    metrics = Metrics()
    worker = ModelWorker(
        lm, store, metrics, args.max_queue, args.chunk_size, args.max_tokens, args.max_batch,
        session_memory=args.session_memory == "on", decode_per_chunk=args.decode_per_chunk,
        decode_step=args.decode_step,
    )  # fmt: skip
    name = args.served_model_name or args.model
    options = ServeOptions(model_id=name, api_keys=tuple(args.api_key))
    return create_app(worker, metrics, options, (response_store or ResponseStore)(folder, args.durable))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.ray is not None:
        from tiermem.serve.ray_serve import cmd_serve_ray

        return cmd_serve_ray(args)
    logging.basicConfig(level=logging.INFO, format="tiermem serve: %(levelname)s %(message)s")
    from tiermem.serve.allocator import fix_mmap_threshold

    fix_mmap_threshold()  # spilled sessions' buffers go back to the OS (see the module)
    api_keys = list(args.api_key)
    if not api_keys and os.environ.get("TIERMEM_API_KEY"):
        args.api_key = [os.environ["TIERMEM_API_KEY"]]
    app = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger("tiermem.serve").warning(
            "binding %s without --api-key: anyone who reaches it can use it", args.host
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
