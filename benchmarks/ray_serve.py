r"""``tiermem serve`` in one process vs ``tiermem serve --ray --replicas 2``: turn latency, session reuse, a kill.

The same conversations (``--conversations`` x ``--turns``, greedy, ``--max-tokens`` each) go one request at a time
through the openai client to (1) one ``tiermem serve`` process and (2) Ray Serve with 2 replicas behind the ingress
on a local Ray (loopback). In the Ray run, the replica that holds the most conversations is killed before turn
``--kill-before``; its conversations continue on the other replica, from the shared sessions folder.

Reported per run: median and 95th-percentile turn latency, the share of later turns whose whole history came from
the stored session (``cached_tokens`` >= the previous turn's prompt), the turns answered; for the Ray run the
slowest turn after the kill (the retry while Ray drops the dead replica, plus the restore from disk), and for both
the session files: bytes per held token and the mean file (durable mode rewrites a session's whole file after each
turn, so a turn writes its file's size to the shared storage). On a shared, loaded 2-core machine the latencies are
indicative only (the load average is printed). Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_serve.py --out bench-out/ray-serve
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import openai

from tiermem.cli import build_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def converse(url: str, model: str, args: argparse.Namespace, kill: Any = None) -> dict[str, Any]:
    """Run the conversations round by round; ``kill(served)`` kills a replica before turn ``args.kill_before`` and
    returns its name."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    histories = [
        [{"role": "user", "content": f"Conversation {i}: my locker code is {4000 + 7 * i}. Please remember it."}]
        for i in range(args.conversations)
    ]
    served: list[list[str]] = [[] for _ in histories]
    previous = [0] * len(histories)
    latencies, after_kill, reused, later, written, victim = [], [], 0, 0, 0, ""
    for turn in range(args.turns):
        if kill is not None and turn == args.kill_before:
            victim = kill(served)
        for i, history in enumerate(histories):
            start = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=history, max_tokens=args.max_tokens, temperature=0
            )
            seconds = time.perf_counter() - start
            reply = raw.parse()
            latencies.append(seconds)
            if kill is not None and turn == args.kill_before:
                after_kill.append(seconds)
            served[i].append(raw.headers.get("x-tiermem-replica", "single"))
            usage = reply.usage
            assert usage is not None and usage.prompt_tokens_details is not None
            if turn:
                later += 1
                reused += (usage.prompt_tokens_details.cached_tokens or 0) >= previous[i]
            previous[i] = usage.prompt_tokens
            written += 1
            history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
            history.append({"role": "user", "content": f"Question {turn + 1}: what is my locker code?"})
    ordered = sorted(latencies)
    out = {
        "turns": written,
        "median_turn_s": round(statistics.median(ordered), 3),
        "p95_turn_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
        "later_turns_from_stored_session": f"{reused}/{later}",
        "replicas_used": dict(Counter(s[0] for s in served)),
    }
    if victim:  # where the killed replica's conversations went (a replacement replica has a new name)
        moved = [s[args.kill_before] for s in served if s[args.kill_before - 1] == victim]
        out["killed"] = victim
        out["its_conversations_went_to"] = dict(Counter(moved))
    if after_kill:
        out["slowest_turn_after_kill_s"] = round(max(after_kill), 2)
        out["median_turn_after_kill_s"] = round(statistics.median(after_kill), 3)
    return out


def session_files(folder: Path) -> dict[str, Any]:
    from tiermem.serve.state import read_header

    files = list(folder.glob("*.session"))
    size = sum(p.stat().st_size for p in files)
    tokens = sum(len(read_header(p)["tokens"]) for p in files)
    return {
        "session_files": len(files),
        "bytes_per_held_token": round(size / max(tokens, 1)),
        "mean_file_mib": round(size / max(len(files), 1) / 2**20, 2),
    }


def single(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import uvicorn

    from tiermem.serve.cli import build

    port = free_port()
    parsed = build_parser().parse_args(["serve", "--model", args.model, "--sessions-dir", str(folder)])
    server = uvicorn.Server(uvicorn.Config(build(parsed), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        return converse(f"http://127.0.0.1:{port}", args.model, args) | session_files(folder)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def on_ray(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from tiermem.raycluster import connect, disconnect
    from tiermem.serve.ray_serve import start

    begin = time.perf_counter()
    cluster = connect(None, num_cpus=2)
    init_s = time.perf_counter() - begin
    argv = ["serve", "--ray", "--replicas", "2", "--model", args.model, "--sessions-dir", str(folder)]
    parsed = build_parser().parse_args([*argv, "--port", str(free_port())])
    try:
        begin = time.perf_counter()
        url = start(parsed)
        deploy_s = time.perf_counter() - begin

        def kill(served: list[list[str]]) -> str:
            import ray

            victim = Counter(s[-1] for s in served).most_common(1)[0][0]
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            name = next(n for n in names if n.endswith(f"#{victim}"))
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            return str(victim)

        result = converse(url, args.model, args, kill)
        return result | session_files(folder) | {"ray_init_s": round(init_s, 1), "deploy_s": round(deploy_s, 1)}
    finally:
        from ray import serve

        serve.shutdown()
        disconnect(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--kill-before", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-out/ray-serve"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    load = os.getloadavg()
    result = {
        "single_process": single(args, args.out / "single"),
        "ray_2_replicas": on_ray(args, args.out / "ray"),
        "load_average_at_start": [round(x, 1) for x in load],
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=1))
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
