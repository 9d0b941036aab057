"""``tiermem serve`` side by side with llama-cpp-python's OpenAI server on the same multi-turn chats (issue 10).

    .venv/bin/python benchmarks/serve_vs_llamacpp.py --chats 8 --turns 8 --prose 2 --max-tokens 32

Each system runs alone, in its own process group on a free 127.0.0.1 port, with 2 threads; the load test client
(:func:`tiermem.serve.loadtest.chat`) drives ``--chats`` concurrent stateless chats (each resends its history) over
the same news prose (``--prose`` articles per user message, seeded by ``--seed``), greedy (temperature 0), every
answer exactly ``--max-tokens`` long (``ignore_eos`` for tiermem; ``min_tokens`` = ``max_tokens`` for llama.cpp,
which has no ``ignore_eos``; ``repeat_penalty`` 1.0 because llama-cpp-python's default is 1.1). The user messages
are the same everywhere; the assistant messages are each system's own answers, so later prompts differ a little.

Systems (``--systems``):

- ``tiermem``: ``tiermem serve --model smollm2`` with its defaults (``--policy auto``, session memory on) and
  ``--formats`` given explicitly (default ``fast``: bf16 activations, the Q4_1 GGUF's weights as int4 in groups of
  32, int8 KV; ``exact``: the GGUF dequantized to float32, KV float32);
- ``tiermem-compressed``: the same with ``--policy streaming --kv-budget 1024`` (``--compressed`` to change it);
- ``tiermem-off``: ``--session-memory off``: every turn re-reads its whole history (the re-prefill baseline);
- ``llamacpp``: ``python -m llama_cpp.server`` from ``.venv-llamacpp`` (llama-cpp-python 0.3.36, built by
  ``benchmarks/llamacpp_compare.py --setup-only``) on the same GGUF, Q4_1 weights and f16 KV, ``--n_ctx 8192``,
  its RAM prompt cache on (``--cache true``, its default 2 GiB, ``--llamacpp-cache``; at 1 GiB, 8 chats of 4k
  tokens evicted each other's states and re-read whole histories), ``--logits_all false`` (its default keeps every
  position's logits and copies them into each cached state), ``--interrupt_requests false`` (its default ends a
  streaming answer as soon as another request waits). This server has no parallel slots: one lock in ``llama_cpp/server/
  app.py`` serves one request at a time, the others wait in line (their wait is in their TTFT). It streams no usage,
  so its prompt tokens are counted with the same tokenizer and chat template (the GGUF's) and its reused tokens are
  read from its verbose log (``N prefix-match hit``).

Both servers get ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``): llama.cpp's threads meet at a GNU OpenMP
barrier after every op, and with the default (spin before sleeping) a process whose 2 threads share 2 busy cores
loses several times its speed (2 chats x 2 turns at load ~8, median TTFT: llama.cpp 18.9 s spinning, 6.9 s
passive; tiermem 1.7 s and 2.2 s).

Writes ``turns.jsonl`` (one row per turn), ``summary.jsonl`` (one row per system) and ``results.md`` (appended) to
``--out`` (default ``bench-out/serve-vs-llamacpp``), and each server's log beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import free_port, machine_note

from tiermem.errors import TiermemError
from tiermem.models import _smollm2_gguf, resolve_source
from tiermem.serve import loadtest

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
BUILD_HINT = "build it with: .venv/bin/python benchmarks/llamacpp_compare.py --setup-only (~11-15 min on 2 cores)"
LABELS = {
    "tiermem": "tiermem serve (auto, --formats {formats})",
    "tiermem-compressed": "tiermem serve ({compressed}, --formats {formats})",
    "tiermem-off": "tiermem serve, session memory off (--formats {formats})",
    "llamacpp": "llama-cpp-python server (Q4_1, prompt cache)",
}


def llamacpp_server_installed() -> bool:
    if not LLAMACPP_PYTHON.exists():
        return False
    probe = subprocess.run([str(LLAMACPP_PYTHON), "-c", "import llama_cpp.server.app"], capture_output=True)
    return probe.returncode == 0


def server_command(system: str, args: argparse.Namespace, port: int, folder: str) -> list[str]:
    if system == "llamacpp":
        command = [str(LLAMACPP_PYTHON), "-m", "llama_cpp.server", "--model", str(_smollm2_gguf())]
        command += ["--n_ctx", "8192", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
        command += ["--cache", "true", "--cache_size", str(args.llamacpp_cache), "--logits_all", "false"]
        return [*command, "--interrupt_requests", "false", "--host", "127.0.0.1", "--port", str(port)]
    command = [sys.executable, "-m", "tiermem.cli", "serve", "--model", "smollm2", "--port", str(port)]
    command += ["--sessions-dir", folder, "--formats", args.formats, *args.tiermem_flags.split()]
    if system == "tiermem-compressed":
        command += args.compressed.split()
    if system == "tiermem-off":
        command += ["--session-memory", "off"]
    return command


def start(command: list[str], log: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server in its own process group; returns it and its base URL once ``/v1/models`` answers."""
    import httpx

    port = command[command.index("--port") + 1]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise TiermemError(f"the server exited with {process.returncode}; see {log}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TiermemError(f"the server did not answer in 300 s; see {log}")
    except BaseException:  # Ctrl-C while it starts too: never leave a server behind
        stop(process)
        raise


def stop(process: subprocess.Popen[bytes]) -> None:
    """End the server's whole process group: SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


async def drive(url: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[list[dict[str, str]]], float]:
    """``args.chats`` concurrent chats; returns their turn records, transcripts and the wall time of all of them."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    client_args = argparse.Namespace(
        turns=args.turns, words=40, prose=args.prose, max_tokens=args.max_tokens, seed=args.seed, ignore_eos=True,
        extra_body={"min_tokens": args.max_tokens, "repeat_penalty": 1.0},
    )  # fmt: skip
    transcripts: list[list[dict[str, str]]] = [[] for _ in range(args.chats)]
    began = time.perf_counter()
    results = await asyncio.gather(
        *(loadtest.chat(client, model, i, client_args, transcripts[i]) for i in range(args.chats))
    )
    wall = time.perf_counter() - began
    await client.close()
    return [r for rows in results for r in rows], transcripts, wall


def count_prompts(records: list[dict[str, Any]], transcripts: list[list[dict[str, str]]]) -> None:
    """Fill ``template_tokens``: each turn's prompt tokenized with the model's chat template, as tiermem's worker
    does (for llama.cpp, which reports none; for tiermem it checks the count against the server's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source("smollm2")), local_files_only=True)
    for record in records:
        messages = transcripts[record["chat"]][: 2 + 2 * record["turn"]]  # system, (user, assistant)*, user
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        record["template_tokens"] = len(tokenizer(str(text), add_special_tokens=False).input_ids)


def llamacpp_reuse(log: Path) -> dict[str, int]:
    """Prompt tokens llama.cpp reused (``N prefix-match hit``) and its prompt-cache hits and misses, from its log."""
    text = log.read_text(errors="replace")
    reused = [int(n) for n in re.findall(r"Llama\.generate: (\d+) prefix-match hit", text)]
    evaluated = [int(n) for n in re.findall(r"prompt eval time = +[\d.]+ ms / +(\d+) tokens", text)]
    return {
        "reused_tokens": sum(reused),
        "evaluated_tokens": sum(evaluated),  # with reused_tokens: the prompt tokens llama.cpp saw, to check ours
        "prefix_hits": len(reused),
        "cache_hits": text.count("_create_completion: cache hit"),
        "cache_misses": text.count("_create_completion: cache miss"),
    }


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def summarize(system: str, records: list[dict[str, Any]], wall: float, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput, decode rate, TTFT per turn index and reuse of one system's run."""
    completion = sum(r["completion_tokens"] for r in records)
    decode_tokens = sum(r["completion_tokens"] - 1 for r in records)
    # Aggregate decode rate: decode tokens over the time in which at least one turn was decoding (the union of
    # each turn's [first token, end] interval), so prefills that ran while nobody decoded do not count.
    spans = sorted((r["began"] + r["ttft_s"], r["began"] + r["turn_s"]) for r in records)
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    by_turn = []
    for turn in range(args.turns):
        ttft = [r["ttft_s"] for r in records if r["turn"] == turn]
        prompt = [r["template_tokens"] for r in records if r["turn"] == turn]
        median, high = round(statistics.median(ttft), 3), round(p90(ttft), 3)
        row = {"turn": turn + 1, "prompt_tokens": statistics.median(prompt), "ttft_median_s": median}
        by_turn.append({**row, "ttft_p90_s": high})
    tpot = [(r["turn_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in records if r["completion_tokens"] > 1]
    prompt_total = sum(r["template_tokens"] for r in records)
    cached = sum(r["cached_tokens"] or 0 for r in records)
    return {
        "system": system,
        "label": LABELS[system].format(compressed=args.compressed, formats=args.formats)
        + (f" {args.tiermem_flags}" if args.tiermem_flags and system != "llamacpp" else ""),
        "chats": args.chats, "turns": args.turns, "prose": args.prose, "max_tokens": args.max_tokens,
        "wall_s": round(wall, 1), "completion_tokens": completion,
        "throughput_tok_s": round(completion / wall, 2), "decode_tok_s": round(decode_tokens / max(busy, 1e-9), 2),
        "tpot_median_ms": round(1000 * statistics.median(tpot), 1),
        "ttft_median_s": round(statistics.median(r["ttft_s"] for r in records), 3),
        "ttft_last_over_first": round(by_turn[-1]["ttft_median_s"] / by_turn[0]["ttft_median_s"], 2),
        "prompt_tokens": prompt_total, "cached_tokens": cached, "cached_fraction": round(cached / prompt_total, 3),
        "last_history_tokens": by_turn[-1]["prompt_tokens"], "threads": args.threads,
        "omp_wait_policy": args.omp_wait_policy, "llamacpp_cache": args.llamacpp_cache, "by_turn": by_turn,
        "note": machine_note(),
    }  # fmt: skip


def run_system(system: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        log = out / f"{system}.log"
        process, url = start(server_command(system, args, free_port(), folder), log, args)
        try:
            records, transcripts, wall = asyncio.run(drive(url, args))
        finally:
            stop(process)
    count_prompts(records, transcripts)
    with (out / "turns.jsonl").open("a") as handle:
        for record in records:
            handle.write(json.dumps({"system": system, **record}) + "\n")
    summary = summarize(system, records, wall, args)
    if system == "llamacpp":
        reuse = llamacpp_reuse(log)
        summary.update(reuse, cached_tokens=reuse["reused_tokens"])
        summary["cached_fraction"] = round(reuse["reused_tokens"] / summary["prompt_tokens"], 3)
    else:
        summary["template_matches_server"] = sum(r["template_tokens"] == r["prompt_tokens"] for r in records)
    summary["first_reply"] = transcripts[0][2]["content"]
    with (out / "summary.jsonl").open("a") as handle:
        handle.write(json.dumps(summary) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "by_turn"}), flush=True)
    return summary


def table(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    head = "| system | wall s | throughput tok/s | decode tok/s (aggregate) | TPOT ms (median) | TTFT median s |"
    head += " TTFT turn 1 / last, median s (p90) | last / first | cached fraction |"
    head += " throughput vs llama.cpp | TTFT vs llama.cpp | load |\n" + "|---" * 12 + "|\n"
    lines = []
    for r in rows:
        first, last = r["by_turn"][0], r["by_turn"][-1]
        ratio = "-" if base is None or r is base else f"{r['throughput_tok_s'] / base['throughput_tok_s']:.2f}x"
        ttft = "-" if base is None or r is base else f"{r['ttft_median_s'] / base['ttft_median_s']:.2f}x"
        lines.append(
            f"| {r['label']} | {r['wall_s']} | {r['throughput_tok_s']} | {r['decode_tok_s']} | {r['tpot_median_ms']}"
            f" | {r['ttft_median_s']} | {first['ttft_median_s']} ({first['ttft_p90_s']}) / {last['ttft_median_s']}"
            f" ({last['ttft_p90_s']}) | {r['ttft_last_over_first']}x | {r['cached_fraction']} | {ratio} | {ttft}"
            f" | {r['note'].split(', ')[-1].removesuffix(' at this row')} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="tiermem,tiermem-compressed,tiermem-off,llamacpp")
    parser.add_argument("--chats", type=int, default=8, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--prose", type=int, default=2, help="news articles per user message")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per turn (EOS ignored)")
    parser.add_argument("--compressed", default="--policy streaming --kv-budget 1024", help="tiermem-compressed flags")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default="fast", help="tiermem's --formats (fast: bf16, int4 weights, int8 KV)")
    parser.add_argument("--tiermem-flags", default="", help="extra flags for each tiermem server")
    parser.add_argument("--llamacpp-cache", type=int, default=2 << 30, help="llama.cpp's prompt cache bytes")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", help="both servers' OMP_WAIT_POLICY ('': unset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-out/serve-vs-llamacpp")
    args = parser.parse_args(argv)
    # SIGTERM (and SIGINT, which a background job ignores) unwinds through run_system's finally: no server left
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    systems = args.systems.split(",")
    if unknown := set(systems) - set(LABELS):
        raise SystemExit(f"unknown systems {sorted(unknown)}: choose from {', '.join(LABELS)}")
    if "llamacpp" in systems and not llamacpp_server_installed():
        raise SystemExit(f"llama.cpp's server needs llama-cpp-python[server] in .venv-llamacpp: {BUILD_HINT}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_system(system, args, out) for system in systems]
    base = next((r for r in rows if r["system"] == "llamacpp"), None)
    text = f"\n{' '.join(sys.argv)}\n\n{table(rows, base)}"
    print(text)
    with (out / "results.md").open("a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
