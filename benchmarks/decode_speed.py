"""Decode speed and KV memory at long context: full attention against compressed caches, in one run.

    .venv/bin/python benchmarks/decode_speed.py --length 8000 --new-tokens 64 --repeats 3 \
        --policies full,snapkv@512,streaming@512 --out bench-out/decode_speed.json

Each repeat runs every policy once on the same needle prompt (interleaved, so machine noise hits all alike), decoding
exactly ``--new-tokens`` tokens (EOS ignored). Reports the median decode tokens/s, prefill seconds, KV bytes held
while decoding, KV peak and process peak RSS, and the ratio of each policy to the first one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tiermem.bench.tasks import make_sample
from tiermem.engine import GenerationConfig, generate
from tiermem.memory import registry
from tiermem.models import load
from tiermem.prompts import build_prompt


def build_policy(spec: str):  # "snapkv@512" or "full"
    name, _, budget = spec.partition("@")
    name, options = registry.parse_spec(name)
    return registry.build(name, kv_budget=int(budget), **options) if budget else registry.build(name, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--policies", default="full,snapkv@512")
    parser.add_argument("--out", default="bench-out/decode_speed.json")
    args = parser.parse_args()

    torch.set_num_threads(2)
    lm = load(args.model)
    sample = make_sample("needle", lm.tokenizer, args.length, 0.5, 0)
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    config = GenerationConfig(max_new_tokens=args.new_tokens, chunk_size=args.chunk_size, stop_on_eos=False)
    specs = args.policies.split(",")
    runs: dict[str, list[dict]] = {spec: [] for spec in specs}
    generate(lm, build_prompt(lm, "warm up", "ok"), build_policy("full"), GenerationConfig(max_new_tokens=4))
    for _ in range(args.repeats):
        for spec in specs:
            result = generate(lm, prompt, build_policy(spec), config)
            runs[spec].append(result.stats.to_dict() | {"text": result.text})

    base = statistics.median(r["decode_tokens_per_second"] for r in runs[specs[0]])
    print(f"{args.model}, prompt {prompt.num_tokens} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print(
        "| policy | decode tok/s | vs first | prefill s | KV kept tok | KV at decode MiB | KV peak MiB | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for spec in specs:
        rows = runs[spec]
        tps = statistics.median(r["decode_tokens_per_second"] for r in rows)
        record = {
            "decode_tokens_per_second": tps,
            "ratio": tps / base,
            "prefill_seconds": statistics.median(r["prefill_seconds"] for r in rows),
            "kv_tokens": rows[0]["kv_tokens"],
            "kv_mib_decode": rows[0]["kv_bytes_decode"] / 2**20,
            "kv_mib_peak": rows[0]["kv_bytes_peak"] / 2**20,
            "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in rows) / 2**20,
        }
        summary[spec] = record | {"runs": rows}
        print(
            f"| {spec} | {tps:.1f} | {record['ratio']:.2f}x | {record['prefill_seconds']:.1f} | "
            f"{record['kv_tokens']} | {record['kv_mib_decode']:.1f} | {record['kv_mib_peak']:.1f} | "
            f"{record['peak_rss_mib']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_tokens": prompt.num_tokens, "policies": summary}, indent=2))


if __name__ == "__main__":
    main()
