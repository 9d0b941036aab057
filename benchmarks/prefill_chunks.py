"""Prefill time against the prefill chunk size, full attention, one prompt.

    .venv/bin/python benchmarks/prefill_chunks.py --length 4096 --chunks 512,1024,2048,4096 --repeats 2

Chunks bound the activation memory; this shows what they cost or save in time (chunk sizes interleaved per repeat).
"""

from __future__ import annotations

import argparse

from tiermem.bench.tasks import make_sample
from tiermem.engine import GenerationConfig, generate
from tiermem.memory import build
from tiermem.models import load
from tiermem.prompts import build_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--chunks", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lm = load(args.model)
    sample = make_sample("needle", lm.tokenizer, args.length, 0.5, 0)
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    chunks = [int(c) for c in args.chunks.split(",")]
    times: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(args.repeats):
        for chunk in chunks:
            result = generate(lm, prompt, build("full"), GenerationConfig(max_new_tokens=2, chunk_size=chunk))
            times[chunk].append(result.stats.prefill_seconds)
    print(f"{args.model}, {prompt.num_tokens} prompt tokens, prefill seconds per repeat")
    for chunk, seconds in times.items():
        print(f"chunk {chunk:5d}: " + " ".join(f"{s:.2f}" for s in seconds))


if __name__ == "__main__":
    main()
