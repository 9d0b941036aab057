"""Fault acceptance of ``tiermem serve`` (issue 10): a fuzz of interleaved sessions with restarts, and kill -9 under
load.

    python benchmarks/serve_fault.py fuzz    --model smollm2 --sessions 64 --restarts 2 --kv-memory 16MB
    python benchmarks/serve_fault.py fuzz    --model smollm2 --sessions 64 --policy streaming --kv-budget 64 \
        --kv-memory 16MB --in-process
    python benchmarks/serve_fault.py killrun --model smollm2 --clients 8 --turns 6 --in-process

``--in-process`` runs the servers that are never SIGKILLed as uvicorn threads of this process (seconds to start
where a new process importing torch takes minutes on a loaded machine); the fuzz's restarts are then a graceful stop
and a stop that skips the store's exit-time writes (what a kill -9 between turns leaves), killrun's kill stays real.

``fuzz``: ``--sessions`` conversations over ``--owners`` API keys, their turns interleaved in a seeded random order
against one server with a small ``--kv-memory`` (idle sessions spill to disk and are restored), restarted
``--restarts`` times between requests (SIGTERM and SIGKILL in turn). Conversations start, continue, fork (a copy of
one conversation takes another turn), edit a past turn (one token of an earlier message changed, the rest resent),
or start with another owner's first prompt word for word. Every request is a ``/v1/completions`` with token ids at
temperature 0 and is sent to a reference server too; the generated ids must be equal. Full attention: the
reference keeps no session state (``--session-memory off``), so any reuse of wrong state shows in the content. A
compressed policy's memory after a turn depends on the turns before it (it compresses every turn), so a stateless
run is a different computation by design; what is promised is that spilling, restoring and restarting change
nothing: the reference is the same policy, the same request order, with every session in RAM and no restart. On
both, ``cached_tokens`` must be what :class:`StoreModel` says the owner's sessions held (a leak across owners or a
wrong restore shows there even when the reference shares the fault).

``killrun``: ``--clients`` concurrent conversations of ``--turns`` turns against a ``--durable`` server; when half
the turns are done, SIGKILL with requests in flight, restart on the same folder, and the clients retry what
failed and go on. A turn is completed when its response was received whole; every next turn must report
``cached_tokens`` covering the completed history. Afterwards each completed turn is replayed on a stateless server
(content check), and the folder is checked for ``.tmp`` leftovers and files that fail their checksum.

Prints a markdown table, writes JSON to ``--out`` (default ``bench-out/serve-fault``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve_fault_checks import (
    Server,
    StoreModel,
    ThreadServer,
    check_folder,
    completion_fields,
    held_after,
)

MAX_SHOWN = 5  # mismatches shown in full in the JSON


def policy_options(args: argparse.Namespace) -> list[str]:
    options = ["--policy", args.policy, "--max-tokens", str(args.max_tokens), "--formats", args.formats]
    options += ["--kv-budget", str(args.kv_budget)] if args.kv_budget else []
    for option in args.policy_opt:
        options += ["--policy-opt", option]
    return options


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)


async def complete(url: str, key: str, model: str, ids: list[int], max_tokens: int) -> tuple[list[int], str, int]:
    async with client(url, key) as c:
        response = await c.completions.create(
            model=model, prompt=ids, max_tokens=max_tokens, temperature=0, extra_body={"return_token_ids": True}
        )
    return completion_fields(response)


# -- fuzz -----------------------------------------------------------------------------------------------------------
class Conversation:
    def __init__(self, name: str, owner: int, history: list[int], first: int):
        self.name, self.owner, self.history, self.first = name, owner, history, first
        self.turns = 0
        self.last_prompt = 0  # where the last request's new message began


def words(rng: random.Random, args: argparse.Namespace, lo: int, hi: int) -> list[int]:
    return [rng.randrange(args.id_low, args.id_high) for _ in range(rng.randint(lo, hi))]


def next_request(
    rng: random.Random, args: argparse.Namespace, convs: list[Conversation], made: int, left: int
) -> tuple[str, Conversation]:
    """Pick the next operation and apply it to a conversation's history (the new message appended)."""
    must_new = args.sessions - made >= left  # the remaining requests are needed to reach --sessions conversations
    talking = [c for c in convs if c.turns >= 1]
    choices = ["new"] if must_new or not convs else ["continue"] * 5 + ["edit"] * 2
    if not must_new and made < args.sessions and convs:
        choices += ["new"] * 3 + (["fork"] * 2 if talking else []) + ["alias"]
    op = rng.choice(choices)
    if op == "edit" and not [c for c in talking if c.last_prompt > 1]:
        op = "continue"
    if op == "new":
        conv = Conversation(f"c{made}", rng.randrange(args.owners), words(rng, args, 16, 48), 0)
        conv.first = len(conv.history)
    elif op == "alias":  # another owner, the same first prompt word for word: must not reuse the other's session
        src = rng.choice(convs)
        owner = (src.owner + rng.randrange(1, args.owners)) % args.owners if args.owners > 1 else src.owner
        conv = Conversation(f"c{made}", owner, src.history[: src.first], src.first)
    elif op == "fork":  # a copy of a conversation takes its own next turn; the original goes on too
        src = rng.choice(talking)
        conv = Conversation(f"c{made}", src.owner, list(src.history), src.first)
        conv.turns, conv.last_prompt = src.turns, src.last_prompt
    else:
        pool = [c for c in talking if c.last_prompt > 1] if op == "edit" else convs
        conv = rng.choice(pool)
        if op == "edit":  # change one token of an earlier message; the answers after it are resent unchanged
            at = rng.randrange(1, conv.last_prompt)
            conv.history[at] = args.id_low + (conv.history[at] - args.id_low + 1) % (args.id_high - args.id_low)
    if op in ("continue", "fork", "edit"):
        conv.history += words(rng, args, 6, 24)
    return op, conv


async def run_fuzz(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    keys = [f"fuzz-key-{i}" for i in range(args.owners)]
    options = policy_options(args)
    full = args.policy == "full"
    kind = ThreadServer if args.in_process else Server
    test = kind(args.model, folder / "test", [*options, "--kv-memory", args.kv_memory], keys, folder / "test.log")
    ref_options = [*options, "--session-memory", "off"] if full else options
    ref = kind(args.model, folder / "ref", ref_options, keys, folder / "ref.log")
    model = StoreModel(truncatable=full)
    convs: list[Conversation] = []
    spread = [round(args.requests * (i + 1) / (args.restarts + 1)) for i in range(args.restarts)]
    kinds = ("term", "kill") if args.restart_kind == "both" else (args.restart_kind,)
    restart_at = {at: kinds[i % len(kinds)] for i, at in enumerate(spread)}  # graceful, then kill -9, ...
    counts = {"requests": 0, "checked": 0, "mismatches": 0, "cached_mismatches": 0, "errors": 0, "restarts": {}}
    ops: dict[str, int] = {}
    shown: list[dict[str, Any]] = []
    cached_sum = 0
    began = time.perf_counter()
    try:
        test.launch()
        ref.launch()
        test.wait()
        ref.wait()
        for index in range(args.requests):
            if index in restart_at:
                how = restart_at[index]
                test.scrape()
                test.stop(how)
                test.start()
                counts["restarts"][how] = counts["restarts"].get(how, 0) + 1
            op, conv = next_request(rng, args, convs, len(convs), args.requests - index)
            if op in ("new", "alias", "fork"):
                convs.append(conv)
            ops[op] = ops.get(op, 0) + 1
            ids, key = list(conv.history), keys[conv.owner]
            session, expect = model.lease(key, ids)
            counts["requests"] += 1
            try:
                got, want = await asyncio.gather(
                    complete(test.url, key, test.model, ids, args.max_tokens),
                    complete(ref.url, key, ref.model, ids, args.max_tokens),
                )
            except openai.OpenAIError as exc:
                counts["errors"] += 1
                model.forget_new(session)
                shown.append({"request": index, "op": op, "error": repr(exc)[:300]})
                continue
            out, finish, cached = got
            model.finish(session, ids, out, finish)
            cached_sum += cached
            counts["checked"] += 1
            bad_content, bad_cached = out != want[0], cached != expect
            counts["mismatches"] += bad_content
            counts["cached_mismatches"] += bad_cached
            if (bad_content or bad_cached) and len(shown) < MAX_SHOWN:
                shown.append({
                    "request": index, "op": op, "conversation": conv.name, "owner": conv.owner, "prompt": len(ids),
                    "ids": out, "reference_ids": want[0], "cached": cached, "expected_cached": expect,
                })  # fmt: skip
            conv.last_prompt = len(ids)
            conv.history = [*ids, *out]
            conv.turns += 1
        test.scrape()
    finally:
        test.stop("term")
        ref.stop("term")
    files = check_folder(folder / "test")
    return {
        "mode": "fuzz", "model": args.model, "policy": args.policy, "kv_budget": args.kv_budget,
        "policy_opt": args.policy_opt, "kv_memory": args.kv_memory, "owners": args.owners, "seed": args.seed,
        "reference": "session-memory off" if full else "same policy, all in RAM, no restarts",
        "sessions": len(convs), "operations": ops, **counts, "cached_tokens_total": cached_sum,
        "server_counters": test.counters, "tracebacks": test.tracebacks() + ref.tracebacks(), "folder": files,
        "seconds": round(time.perf_counter() - began, 1), "shown": shown,
    }  # fmt: skip


# -- killrun --------------------------------------------------------------------------------------------------------
async def run_killrun(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    options = [*policy_options(args), "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients)]
    server = Server(args.model, folder / "sessions", options, [], folder / "server.log")
    rng = random.Random(args.seed)
    total = args.clients * args.turns
    state: dict[str, Any] = {"done": 0, "in_flight": 0, "killed": 0}
    log: list[dict[str, Any]] = []  # every completed turn
    failures: list[dict[str, Any]] = []  # requests that failed (in flight at a kill), then retried

    async def conversation(c: int) -> None:
        history = [rng.randrange(args.id_low, args.id_high) for _ in range(rng.randint(16, 48))]
        held, kills_seen = 0, 0
        for turn in range(args.turns):
            if turn:
                history += [rng.randrange(args.id_low, args.id_high) for _ in range(rng.randint(6, 24))]
            while True:
                url, kills = server.url, state["killed"]
                state["in_flight"] += 1
                try:
                    out, finish, cached = await complete(url, "none", server.model, history, args.max_tokens)
                    break
                except (openai.OpenAIError, OSError) as exc:
                    status = getattr(exc, "status_code", None)  # an HTTP answer, not a dead server: a server fault
                    failures.append({"client": c, "turn": turn, "error": type(exc).__name__, "status": status})
                    if status is not None and sum(f["status"] is not None for f in failures) > 3 * args.clients:
                        raise
                    waited = time.monotonic()
                    while (state["killed"] == kills and time.monotonic() - waited < 5) or not server.url:
                        await asyncio.sleep(0.1)  # a kill: wait for the restart, then send the same turn again
                finally:
                    state["in_flight"] -= 1
            log.append({
                "client": c, "turn": turn, "ids": list(history), "out": out, "finish": finish, "cached": cached,
                "expected_min": held, "after_kill": kills_seen != state["killed"],
            })  # fmt: skip
            kills_seen = state["killed"]
            held = held_after(history, out, finish)
            history = [*history, *out]
            state["done"] += 1

    async def killer() -> None:
        for k in range(args.kills):
            while state["done"] < total * (k + 1) // (args.kills + 1) or state["in_flight"] == 0:
                await asyncio.sleep(0.005)
            in_flight = state["in_flight"]
            server.scrape()
            server.stop("kill")
            state["killed"] += 1
            await asyncio.to_thread(server.start)
            state.setdefault("in_flight_at_kill", []).append(in_flight)

    full = args.policy == "full"
    ref = (ThreadServer if args.in_process else Server)(
        args.model, folder / "ref", [*policy_options(args), "--session-memory", "off"], [], folder / "ref.log"
    )
    mismatches = []
    try:
        server.launch()
        if full:  # started now, idle until the replay: its start overlaps the run's
            ref.launch()
        server.wait()
        began = time.perf_counter()
        await asyncio.gather(killer(), *(conversation(c) for c in range(args.clients)))
        seconds = time.perf_counter() - began
        server.scrape()
        server.stop("term")
        if full:  # content: each completed turn again on a stateless server, one at a time
            ref.wait()
            for r in log:
                out, _, _ = await complete(ref.url, "none", ref.model, r["ids"], args.max_tokens)
                if out != r["out"]:
                    mismatches.append({k: r[k] for k in ("client", "turn", "out")} | {"reference": out})
    finally:
        server.stop("term")
        ref.stop("term")
    files = check_folder(folder / "sessions")
    short = [r for r in log if r["cached"] < r["expected_min"]]
    survived = [r for r in log if r["after_kill"] and r["expected_min"] > 0]
    return {
        "mode": "killrun", "model": args.model, "policy": args.policy, "kv_budget": args.kv_budget,
        "clients": args.clients, "turns": args.turns, "kills": args.kills, "seed": args.seed,
        "completed_turns": len(log), "failed_requests_retried": len(failures),
        "http_errors": sum(f["status"] is not None for f in failures),
        "in_flight_at_kill": state.get("in_flight_at_kill", []),
        "turns_short_of_history": len(short), "first_turns_after_kill": len(survived),
        "first_turns_after_kill_fully_cached": sum(r["cached"] >= r["expected_min"] for r in survived),
        "content_checked": len(log) if full else 0, "content_mismatches": len(mismatches),
        "server_counters": server.counters, "tracebacks": server.tracebacks() + ref.tracebacks(), "folder": files,
        "seconds": round(seconds, 1), "shown": (short + mismatches)[:MAX_SHOWN],
    }  # fmt: skip


# -- report ---------------------------------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> str:
    skip = {"shown", "mode"}
    rows = [
        f"| {k} | {json.dumps(v) if isinstance(v, dict | list) else v} |" for k, v in result.items() if k not in skip
    ]
    return "\n".join([f"| {result['mode']} | |", "|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["fuzz", "killrun"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--policy", default="full")
    parser.add_argument("--kv-budget", type=int)
    parser.add_argument("--policy-opt", action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--id-low", type=int, default=3, help="prompt ids are drawn from [id-low, id-high)")
    parser.add_argument("--id-high", type=int, default=250)
    parser.add_argument("--sessions", type=int, default=64, help="fuzz: conversations")
    parser.add_argument("--requests", type=int, help="fuzz: requests in all (default 3 per conversation)")
    parser.add_argument("--owners", type=int, default=4, help="fuzz: API keys")
    parser.add_argument("--restarts", type=int, default=4, help="fuzz: restarts between requests (TERM, KILL, ...)")
    parser.add_argument("--restart-kind", choices=["both", "term", "kill"], default="both", help="fuzz: TERM, KILL")
    parser.add_argument("--kv-memory", default="1MB", help="fuzz: the server's --kv-memory (small: sessions spill)")
    parser.add_argument(
        "--formats",
        default="exact",
        choices=["exact", "fast"],
        help="the servers' number formats; answers are compared with a server that recomputes every prompt, and in "
        "bfloat16 a cache built token by token and one recomputed in a chunk round differently (a GEMV against a "
        "GEMM), so the content check needs exact formats (spill and restore are bitwise in any format)",
    )
    parser.add_argument("--clients", type=int, default=8, help="killrun: concurrent conversations")
    parser.add_argument("--turns", type=int, default=6, help="killrun: turns per conversation")
    parser.add_argument("--kills", type=int, default=1, help="killrun: SIGKILLs, evenly spread over the run")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the servers that are never SIGKILLed in this process, uvicorn in a thread (fuzz: every server, a "
        "kill skips the exit-time writes; killrun: the reference)",
    )
    parser.add_argument("--out", default="bench-out/serve-fault")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally blocks) when stopped
    args.requests = args.requests or 3 * args.sessions
    if args.mode == "fuzz" and args.requests < args.sessions:
        parser.error("--requests must be at least --sessions")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve-fault-") as tmp:
        run = run_fuzz if args.mode == "fuzz" else run_killrun
        result = asyncio.run(run(args, Path(tmp)))
    print(table(result))
    name = f"{args.mode}-{Path(args.model).name}-{args.policy}-s{args.seed}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
