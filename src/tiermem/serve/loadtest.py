"""Load test for ``tiermem serve``: concurrent multi-turn chats from stateless clients (each resends its history).

    python -m tiermem.serve.loadtest --url http://127.0.0.1:8000 --chats 4 --turns 6 --max-tokens 32

Per turn it records the prompt and cached tokens the server reports, the time to the first streamed token and the
turn's total time; it prints one JSON line per turn and a summary by turn index (medians over chats), so one sees
whether a turn's cost follows its new tokens (reuse) or its whole history. Needs the ``openai`` client (dev extra).

``--prose N`` makes each user message N news articles of real prose (the Lee corpus, :mod:`tiermem.bench.haystack`)
and a request for a one-sentence summary, so a 20-turn chat with ``--prose 2`` passes 8k tokens of history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

TEXT = "memory tier cache session token model policy window block disk restore spill history prefix budget sink"
TEXT += " retrieval context answer question number river mountain city garden letter music paper light stone"
WORDS = TEXT.split(" ")


def user_message(rng: random.Random, turn: int, args: argparse.Namespace) -> str:
    """Turn ``turn``'s user message: random words, or ``args.prose`` news articles to summarize."""
    if not getattr(args, "prose", 0):
        words = " ".join(rng.choice(WORDS) for _ in range(args.words))
        return f"Note {turn}: {words}. Reply briefly."
    from tiermem.bench.haystack import prose_documents

    documents = prose_documents()
    picked = [" ".join(documents[rng.randrange(len(documents))]) for _ in range(args.prose)]
    return "Here is the news:\n\n" + "\n\n".join(picked) + "\n\nSummarize it in one sentence."


async def chat(
    client: Any, model: str, index: int, args: argparse.Namespace, transcript: list[dict[str, str]] | None = None
) -> list[dict[str, Any]]:
    """One conversation of ``args.turns`` turns; its messages are appended to ``transcript`` when given."""
    rng = random.Random(args.seed + index)
    messages = transcript if transcript is not None else []
    messages.append({"role": "system", "content": "You are a concise assistant."})
    records = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": user_message(rng, turn, args)})
        began = time.perf_counter()
        first = None
        pieces: list[str] = []
        usage = None
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": getattr(args, "ignore_eos", False), **getattr(args, "extra_body", {})},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    pieces.append(choice.delta.content)
        ended = time.perf_counter()
        messages.append({"role": "assistant", "content": "".join(pieces)})
        # A server that streams no usage (llama-cpp-python's) gets None for the prompt and cached tokens and its
        # streamed content chunks as completion tokens (one chunk per sampled token there).
        details = usage.prompt_tokens_details if usage is not None else None
        records.append(
            {
                "chat": index,
                "turn": turn,
                "prompt_tokens": usage.prompt_tokens if usage is not None else None,
                "cached_tokens": details.cached_tokens if details is not None else None,
                "completion_tokens": usage.completion_tokens if usage is not None else len(pieces),
                "ttft_s": round((first or ended) - began, 4),
                "turn_s": round(ended - began, 4),
                "began": round(began, 4),  # perf_counter at the request: when turns of concurrent chats overlapped
            }
        )
        print(json.dumps(records[-1]), flush=True)
    return records


async def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import openai
    except ImportError:
        raise SystemExit("the load test needs the openai client: pip install openai") from None
    client = openai.AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    began = time.perf_counter()
    results = await asyncio.gather(*(chat(client, model, i, args) for i in range(args.chats)))
    wall = time.perf_counter() - began
    await client.close()
    records = [r for chat_records in results for r in chat_records]
    by_turn = []
    for turn in range(args.turns):
        rows = [r for r in records if r["turn"] == turn]
        by_turn.append(
            {
                "turn": turn,
                "prompt_tokens": statistics.median(r["prompt_tokens"] for r in rows),
                "new_tokens": statistics.median(r["prompt_tokens"] - r["cached_tokens"] for r in rows),
                "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            }
        )
    generated = sum(r["completion_tokens"] for r in records)
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    return {
        "chats": args.chats,
        "turns": args.turns,
        "wall_s": round(wall, 2),
        "generated_tokens": generated,
        "cached_fraction": round(cached / max(prompt, 1), 4),
        "by_turn": by_turn,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tiermem.serve.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--chats", type=int, default=4, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--words", type=int, default=40, help="words per user message")
    parser.add_argument("--prose", type=int, default=0, help="news articles per user message (0: random words)")
    parser.add_argument("--ignore-eos", action="store_true", help="every answer is --max-tokens long")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    print(json.dumps({"summary": asyncio.run(run(parser.parse_args(argv)))}))


if __name__ == "__main__":
    main()
