"""The server's memory bound: peak RSS against model + ``--kv-memory`` while idle sessions sit on disk (issue 10).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_memory.py --kv-memory 64MB --chats 8 --turns 3 --prose 1

Starts ``tiermem serve`` (a subprocess on a free loopback port, its own sessions folder), samples its RSS every
0.1 s from ``/proc``, drives ``--chats`` concurrent multi-turn chats over news prose (``tiermem.serve.loadtest``)
whose sessions together hold several times ``--kv-memory``, and reads the server's ``/metrics`` at the end.
Reports the RSS once the model is loaded and before any request (the baseline: weights, tokenizer, Python, torch),
the peak RSS during the run, what the sessions hold per tier, and the overhead: peak − baseline − ``--kv-memory``
(prefill activations of one chunk, the decode batch, allocator slack). Writes ``bench-out/serve-memory/*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _serve_fault_checks import Server

from tiermem.serve.loadtest import run as run_chats
from tiermem.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of ``pid`` now (``VmRSS``; ``RssAnon``: heap and tensors, ``RssFile``: mapped files such
    as the weights' safetensors), 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0


def rss_split(pid: int) -> dict[str, float]:
    return {f: round(rss_bytes(pid, f) / MIB, 1) for f in ("VmRSS", "RssAnon", "RssFile")}


class Sampler(threading.Thread):
    """The peak RSS of a process, sampled every ``period`` seconds until :meth:`stop`."""

    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self._done = pid, period, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.period)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def metrics(port: int) -> dict[str, float]:
    """The gauges and counters of ``/metrics`` whose names start with ``tiermem_`` (labels kept in the key)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tiermem_") and "_bucket" not in line
    }


def measure(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sessions"
        options = ["--kv-memory", args.kv_memory, "--policy", args.policy]
        server = Server(args.model, folder, options, [], Path(tmp) / "server.log")
        server.start(timeout=300)
        assert server.process is not None
        process, port = server.process, int(server.url.rsplit(":", 1)[1])
        try:
            time.sleep(1.0)
            baseline = rss_bytes(process.pid)
            baseline_split = rss_split(process.pid)
            sampler = Sampler(process.pid)
            sampler.start()
            chats = argparse.Namespace(
                url=f"http://127.0.0.1:{port}", api_key="none", chats=args.chats, turns=args.turns, words=40,
                prose=args.prose, ignore_eos=True, max_tokens=args.max_tokens, seed=args.seed,
            )  # fmt: skip
            summary = asyncio.run(run_chats(chats))
            time.sleep(0.5)
            peak = sampler.stop()
            end_rss = rss_bytes(process.pid)
            end_split = rss_split(process.pid)
            gauges = metrics(port)
            on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        finally:
            server.stop()
    limit = parse_size(args.kv_memory)
    kv = {k: v for k, v in gauges.items() if k.startswith(("tiermem_kv_bytes", "tiermem_sessions"))}
    return {
        "model": args.model, "policy": args.policy, "kv_memory_bytes": limit, "chats": args.chats,
        "turns": args.turns, "prose": args.prose, "max_tokens": args.max_tokens,
        "baseline_rss_mib": round(baseline / MIB, 1), "peak_rss_mib": round(peak / MIB, 1),
        "end_rss_mib": round(end_rss / MIB, 1), "kv_memory_mib": round(limit / MIB, 1),
        "baseline_split_mib": baseline_split, "end_split_mib": end_split,
        "overhead_mib": round((peak - baseline - limit) / MIB, 1), "session_files_mib": round(on_disk / MIB, 1),
        "tiers": kv, "spills": gauges.get("tiermem_sessions_spilled_total"),
        "restores": gauges.get("tiermem_sessions_restored_total"), "wall_s": summary["wall_s"],
        "cached_fraction": summary["cached_fraction"], "by_turn": summary["by_turn"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--policy", default="full")
    parser.add_argument("--kv-memory", default="64MB")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--prose", type=int, default=1, help="news articles per user message")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench-out" / "serve-memory"))
    args = parser.parse_args()
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.policy}-{args.kv_memory}-{args.chats}x{args.turns}.json".replace(":", "_")
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "by_turn"}, indent=1))


if __name__ == "__main__":
    main()
