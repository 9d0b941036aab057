"""Acceptance benchmarks of ``tiermem serve`` (issue 10): flat turn latency, restore vs re-prefill, batched decoding,
and token-identical continuation after RAM -> disk -> restore.

    python benchmarks/serve_turns.py turns    --policy streaming --kv-budget 1024 --turns 20 --prose 2 --max-tokens 8
    python benchmarks/serve_turns.py restore  --policy full --history 2048 4096
    python benchmarks/serve_turns.py batch    --sessions 8 --max-tokens 64
    python benchmarks/serve_turns.py identity --conversations 20

``turns`` starts ``tiermem serve`` twice (session memory on, then off) and drives one chat over real prose through
the load test client (:mod:`tiermem.serve.loadtest`): TTFT per turn and turn N over turn 1. ``restore``, ``batch``
and ``identity`` run the server's model worker in this process (no HTTP), so their timings are the worker's own.
Every part prints JSON lines and writes ``--out`` (default ``bench-out/serve-turns``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import free_port, machine_note

from tiermem.cache import TierCache
from tiermem.cli import make_policy
from tiermem.errors import TiermemError
from tiermem.formats import apply_preset
from tiermem.layer_info import describe_layers
from tiermem.memory import registry
from tiermem.memory.base import Policy
from tiermem.models import LoadedModel, load
from tiermem.serve.cli import off_main_thread
from tiermem.serve.metrics import Metrics
from tiermem.serve.policies import SessionPolicies
from tiermem.serve.sessions import SessionStore
from tiermem.serve.turns import Job, Turn
from tiermem.serve.worker import ModelWorker

# Settings small enough that a conversation of a few hundred tokens is compressed, evicted or cut into blocks (the
# session files then carry real policy state); the others run with their defaults or a 64-token budget.
SMALL: dict[str, dict[str, Any]] = {
    "snapkv": {"kv_budget": 64, "window_size": 16},
    "snapkv-chunk": {"kv_budget": 96, "window_size": 16, "chunk_size": 16},
    "snapkv-sentence": {"kv_budget": 96, "window_size": 16, "chunk_size": 16},
    "streaming": {"kv_budget": 64},
    "infllm": {"n_init": 16, "n_local": 64, "block_size": 16, "topk": 2, "exc_block_size": 32, "repr_topk": 4},
    "infllm-small": {"n_init": 16, "n_local": 64, "block_size": 16, "topk": 2, "exc_block_size": 32},
    "infllm-heads": {"n_init": 16, "n_local": 64, "block_size": 16, "topk": 2, "exc_block_size": 32},
    "emllm": {"n_init": 16, "n_local": 64, "exc_block_size": 32, "min_block_size": 8, "max_block_size": 16},
    "emllm-small": {"n_init": 16, "n_local": 64, "exc_block_size": 32, "min_block_size": 8, "max_block_size": 16},
    "sentencekv": {"token_budget": 96, "start_budget": 8, "recent_budget": 16, "window_size": 16},
}


def emit(out: Path, part: str, row: dict[str, Any]) -> None:
    line = json.dumps({"part": part, **row})
    print(line, flush=True)
    with (out / f"{part}.jsonl").open("a") as handle:
        handle.write(line + "\n")


def small_policy(name: str) -> Policy:
    """``name`` with settings that make short conversations exercise its state (see ``SMALL``)."""
    if name in SMALL:
        return registry.build(name, **SMALL[name])
    if registry.takes_budget(name) and not registry.budget_optional(name):
        return registry.build(name, kv_budget=64)
    return registry.build(name)


def make_worker(
    lm: LoadedModel, policy: Policy, folder: Path, kv_memory: int | None = None, durable: bool = True, **kw: Any
) -> ModelWorker:
    def make_cache(chosen: Policy) -> TierCache:
        return TierCache(lm.model, chosen, tokenizer=lm.tokenizer)

    key = {"model": "bench", "policy": repr(policy), "dtype": "float32"}
    policies = SessionPolicies(policy, describe_layers(lm.model), None)
    store = SessionStore(folder, key, policies, make_cache, kv_memory, durable=durable)
    return ModelWorker(lm, store, Metrics(), **kw)


def run_turn(worker: ModelWorker, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One greedy turn on this thread: the start and done events merged, plus ``seconds`` (whole turn)."""
    loop = asyncio.new_event_loop()
    try:
        job = Job(Turn("", max_tokens, 0.0, 1.0, 0, ignore_eos=True, prompt=prompt), loop)
        began = time.perf_counter()
        worker._run(job)
        seconds = time.perf_counter() - began
        loop.run_until_complete(asyncio.sleep(0))
        events: dict[str, Any] = {"seconds": seconds}
        while not job.events.empty():
            kind, data = job.events.get_nowait()
            if kind == "error":
                raise data
            if kind in ("start", "done"):
                events.update(data)
        return events
    finally:
        loop.close()


def prose_ids(lm: LoadedModel, tokens: int, seed: int) -> list[int]:
    """About ``tokens`` tokens of news prose, starting at a seeded article."""
    from tiermem.bench.haystack import prose_sentences

    sentences = prose_sentences(seed)
    text, ids = "", []
    for sentence in sentences:
        text += sentence + " "
        if len(text) > tokens * 3:
            ids = lm.tokenizer(text).input_ids
            if len(ids) >= tokens:
                break
    return list(ids[:tokens])


# -- (a) turn latency over a growing chat, through the HTTP server -----------------------------------------------
def _serve(args: argparse.Namespace, memory: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "tiermem.cli", "serve", "--model", args.model, "--policy", args.policy]
    command += ["--sessions-dir", str(folder), "--port", str(port), "--session-memory", memory]
    command += ["--kv-budget", str(args.kv_budget)] if args.kv_budget else []
    for option in args.policy_opt:
        command += ["--policy-opt", option]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TiermemError(f"the server exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise TiermemError("the server did not start in 300 s")


async def _first_token(url: str, messages: list[dict[str, str]]) -> float:
    """Seconds to the first streamed token of one answer to ``messages`` (a fresh client, as a new request)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    began = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=1, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    first = None
    async for chunk in stream:
        if first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter()
    await client.close()
    return (first or time.perf_counter()) - began


def part_turns(args: argparse.Namespace, out: Path) -> None:
    """Session memory on: one chat of ``args.turns`` turns through the load test client. Off: the same histories
    (the recorded messages) at the turns in ``args.replay``, each re-read whole by a server that keeps nothing."""
    from tiermem.serve import loadtest

    client_args = argparse.Namespace(
        chats=1, turns=args.turns, words=40, prose=args.prose, max_tokens=args.max_tokens, seed=args.seed,
        ignore_eos=True, api_key="none",
    )  # fmt: skip
    transcript: list[dict[str, str]] = []
    ttft: dict[str, dict[int, float]] = {"on": {}, "off": {}}
    prompt_tokens: dict[int, int] = {}
    for memory in ("on", "off"):
        with tempfile.TemporaryDirectory() as folder:
            process, url = _serve(args, memory, Path(folder))
            try:
                client_args.url = url
                if memory == "on":

                    async def one_chat(url: str = url) -> list[dict[str, Any]]:
                        import openai

                        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
                        model = (await client.models.list()).data[0].id
                        return await loadtest.chat(client, model, 0, client_args, transcript)

                    for record in asyncio.run(one_chat()):
                        ttft["on"][record["turn"] + 1] = record["ttft_s"]
                        prompt_tokens[record["turn"] + 1] = record["prompt_tokens"]
                        emit(out, "turns", {"session_memory": "on", "policy": args.policy, **record})
                else:
                    for turn in sorted(set(args.replay) & set(prompt_tokens)):
                        history = transcript[: 2 * turn]  # system, then (user, assistant) pairs; ends at user turn
                        ttft["off"][turn] = asyncio.run(_first_token(url, history))
                        row = {"turn": turn - 1, "prompt_tokens": prompt_tokens[turn], "ttft_s": ttft["off"][turn]}
                        emit(out, "turns", {"session_memory": "off", "policy": args.policy, **row})
            finally:
                process.terminate()
                process.wait(timeout=60)
    last = max(ttft["on"])
    summary: dict[str, Any] = {
        "policy": args.policy, "kv_budget": args.kv_budget, "policy_opt": args.policy_opt, "turns": last,
        "history_tokens": prompt_tokens[last], "max_tokens": args.max_tokens, "note": machine_note(),
    }  # fmt: skip
    for memory, times in ttft.items():
        if 1 in times and last in times:
            summary[f"{memory}_ttft_first_s"], summary[f"{memory}_ttft_last_s"] = times[1], times[last]
            summary[f"{memory}_last_over_first"] = round(times[last] / times[1], 3)
    emit(out, "turns-summary", summary)


# -- (b) restore from disk vs re-prefill ---------------------------------------------------------------------------
def part_restore(args: argparse.Namespace, out: Path) -> None:
    lm = load(args.model)
    policy = make_policy(args.policy, args.kv_budget, None, args.policy_opt)
    for history in args.history:
        prompt = prose_ids(lm, history, args.seed)
        follow = prose_ids(lm, 32, args.seed + 1)
        times: dict[str, list[float]] = {"ram": [], "disk": [], "prefill": []}
        for _ in range(args.repeats):
            for tier, kv_memory in (("ram", None), ("disk", 1)):
                with tempfile.TemporaryDirectory() as folder:
                    worker = make_worker(lm, policy, Path(folder), kv_memory)
                    first = run_turn(worker, prompt, 1)
                    held = prompt + first["ids"]
                    turn = run_turn(worker, [*held, *follow], 1)  # 1 token: the time is the time to it
                    assert turn["cached_tokens"] >= len(prompt), turn
                    times[tier].append(turn["seconds"])
            with tempfile.TemporaryDirectory() as folder:
                cold = make_worker(lm, policy, Path(folder), session_memory=False)
                times["prefill"].append(run_turn(cold, [*held, *follow], 1)["seconds"])
        median = {k: statistics.median(v) for k, v in times.items()}
        emit(
            out,
            "restore",
            {
                "policy": repr(policy), "history_tokens": len(held) + len(follow),
                **{f"{k}_s": round(v, 4) for k, v in median.items()},
                "disk_over_prefill": round(median["disk"] / median["prefill"], 3),
                "ram_over_prefill": round(median["ram"] / median["prefill"], 3), "repeats": args.repeats,
                "note": machine_note(),
            },
        )  # fmt: skip


# -- (c) aggregate decode throughput: N concurrent sessions vs one ----------------------------------------------
def _decode_rate(lm: LoadedModel, policy: Policy, sessions: int, args: argparse.Namespace) -> dict[str, float]:
    """Decode tokens/s of ``sessions`` turns run together by the worker's loop. The worker admits every queued turn
    (prefilling its prompt) before the first decode step, so decoding is timed from the last first token to the
    end, and counts the tokens after each turn's first (which comes from its prefill)."""
    with tempfile.TemporaryDirectory() as folder:
        worker = make_worker(lm, policy, Path(folder), max_batch=max(sessions, 1), max_queue=64)
        loop = asyncio.new_event_loop()
        jobs = [
            Job(Turn("", args.max_tokens, 0.0, 1.0, 0, ignore_eos=True, prompt=prose_ids(lm, 64, i)), loop)
            for i in range(sessions)
        ]
        firsts: list[float] = []
        first_token = worker.metrics.first_token

        def record(seconds: float) -> None:
            firsts.append(time.perf_counter())
            first_token(seconds)

        worker.metrics.first_token = record  # type: ignore[method-assign]
        worker.start()
        began = time.perf_counter()
        for job in jobs:
            worker.submit(job)
        done = 0

        async def wait() -> None:
            nonlocal done
            for job in jobs:
                while True:
                    kind, data = await job.events.get()
                    if kind == "error":
                        raise data
                    if kind == "done":
                        done += len(data["ids"])
                        break

        loop.run_until_complete(wait())
        ended = time.perf_counter()
        worker.stop()
        loop.close()
    decode_s = ended - max(firsts)
    return {"tokens_per_s": (done - sessions) / decode_s, "with_prefill_tokens_per_s": done / (ended - began)}


def part_batch(args: argparse.Namespace, out: Path) -> None:
    preset = argparse.Namespace(formats=args.formats, dtype=None, weights_quant=None, kv_dtype=None)
    apply_preset(preset)  # the KV stays as the session caches here store it (auto: the compute dtype)
    lm = off_main_thread(load, args.model, preset.dtype, weights_quant=preset.weights_quant)  # as tiermem serve
    policy = make_policy(args.policy, args.kv_budget, None, args.policy_opt)
    _decode_rate(lm, policy, 1, argparse.Namespace(max_tokens=4))  # warm-up
    one = [_decode_rate(lm, policy, 1, args) for _ in range(args.repeats)]
    many = [_decode_rate(lm, policy, args.sessions, args) for _ in range(args.repeats)]
    single, batched = (statistics.median(r["tokens_per_s"] for r in rows) for rows in (one, many))
    whole = [statistics.median(r["with_prefill_tokens_per_s"] for r in rows) for rows in (one, many)]
    emit(out, "batch", {
        "policy": repr(policy), "sessions": args.sessions, "max_tokens": args.max_tokens,
        "single_tokens_per_s": round(single, 2), "batched_tokens_per_s": round(batched, 2),
        "ratio": round(batched / single, 2), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "with_prefill_ratio": round(whole[1] / whole[0], 2), "formats": lm.weights_format,
        "native": os.environ.get("TIERMEM_NATIVE", "1"), "note": machine_note(),
    })  # fmt: skip


# -- (d) greedy continuation after RAM -> disk -> restore equals the never-spilled run ---------------------------
def _conversation(worker: ModelWorker, lm: LoadedModel, index: int, args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(args.seed + index)
    history: list[int] = []
    answers = []
    for turn in range(args.conversation_turns):
        history += prose_ids(lm, args.turn_tokens, rng.randrange(300) + turn)
        last = turn == args.conversation_turns - 1  # earlier turns answer in one token: the last one is compared
        result = run_turn(worker, history, args.max_tokens if last else args.first_tokens)
        history += result["ids"]
        answers.append(result["ids"])
    return answers


def part_identity(args: argparse.Namespace, out: Path) -> None:
    lm = load(args.model)
    names = args.policies or [n for n in registry.names() if n != "auto"]
    for name in names:
        policy = small_policy(name)
        same = errors = 0
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            kept = make_worker(lm, policy, Path(folder) / "ram", durable=False)
            spilled = make_worker(lm, policy, Path(folder) / "disk", kv_memory=1, durable=False)  # spills when idle
            for index in range(args.conversations):
                try:
                    a = _conversation(kept, lm, index, args)
                    b = _conversation(spilled, lm, index, args)
                except (TiermemError, RuntimeError, ValueError) as exc:
                    errors += 1
                    emit(out, "identity-error", {"policy": name, "conversation": index, "error": str(exc)[:200]})
                    continue
                same += a == b
            restored = spilled.store.stats().restored
        emit(
            out,
            "identity",
            {
                "policy": name, "conversations": args.conversations, "identical": same, "errors": errors,
                "restores": restored, "turns": args.conversation_turns, "turn_tokens": args.turn_tokens,
                "first_tokens": args.first_tokens, "compared_tokens": args.max_tokens,
                "seconds": round(time.perf_counter() - started, 1),
            },
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["turns", "restore", "batch", "identity"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--policy", default="full")
    parser.add_argument("--kv-budget", type=int)
    parser.add_argument("--policy-opt", action="append", default=[])
    parser.add_argument("--turns", type=int, default=20, help="turns: chat length")
    parser.add_argument("--prose", type=int, default=2, help="turns: news articles per user message")
    parser.add_argument("--replay", type=int, nargs="*", default=[1, 20], help="turns: turns re-read with memory off")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per turn")
    parser.add_argument("--history", type=int, nargs="+", default=[2048, 4096], help="restore: history tokens")
    parser.add_argument("--sessions", type=int, default=8, help="batch: concurrent sessions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=20, help="identity: conversations per policy")
    parser.add_argument("--conversation-turns", type=int, default=3)
    parser.add_argument("--turn-tokens", type=int, default=80, help="identity: prose tokens per user turn")
    parser.add_argument("--first-tokens", type=int, default=8, help="identity: tokens answered before the last turn")
    parser.add_argument("--policies", nargs="*", help="identity: these policies (default: every registered one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default="exact", choices=["exact", "fast"], help="batch: number formats")
    parser.add_argument("--out", default="bench-out/serve-turns")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    {"turns": part_turns, "restore": part_restore, "batch": part_batch, "identity": part_identity}[args.part](args, out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
