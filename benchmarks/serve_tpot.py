"""Time per output token of ``tiermem serve`` over HTTP: one chat at a time, streamed, greedy, 64 tokens.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_tpot.py                    # the defaults (fused step)
    TIERMEM_NATIVE=0 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_tpot.py   # the Python decode step

Starts the server on a free loopback port with a fresh sessions folder, sends one warm-up chat, then ``--chats``
chats of ``--max-tokens``; TPOT is the time from a chat's first streamed piece to its last over the pieces between.
Extra arguments after ``--`` go to ``tiermem serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _machine import free_port

ROOT = Path(__file__).resolve().parents[1]


def chat_tpot(url: str, index: int, max_tokens: int) -> float:
    """Milliseconds per streamed piece after the first, for one chat."""
    content = f"Tell me a long story about a dragon, number {index}."
    body = {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    stamps: list[float] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0].get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("serve_args", nargs="*", help="after --: more tiermem serve flags")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as sessions:
        command = [str(ROOT / ".venv/bin/tiermem"), "serve", "--port", str(port), "--sessions-dir", sessions]
        server = subprocess.Popen([*command, *args.serve_args], env=dict(os.environ), stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):  # a first start may build the fused step (about a minute)
                try:
                    httpx.get(url + "/v1/models", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.5)
            chat_tpot(url, 0, args.max_tokens)  # warm-up
            tpot = [chat_tpot(url, i, args.max_tokens) for i in range(1, args.chats + 1)]
        finally:
            server.terminate()
            server.wait()
    native = os.environ.get("TIERMEM_NATIVE", "1")
    print(json.dumps({"tpot_ms": [round(t, 1) for t in tpot], "median_ms": round(statistics.median(tpot), 1),
                      "native": native}))  # fmt: skip


if __name__ == "__main__":
    main()
