"""Block memory under a fixed KV memory limit: peak RSS and decode time at 4k against 32k tokens, RAM against disk.

    .venv/bin/python benchmarks/memory_scaling.py --policies infllm,emllm --lengths 4096,32768 --kv-memory 512MB \
        --new-tokens 32 --out bench-out/memory_scaling.json

For each policy and length, one passkey prompt (depth 0.5) runs with cold blocks on disk under the limit; the longest
length also runs with every block in RAM, and the two answers must be the same tokens. Reports peak RSS (the
process high-water mark during the run, model weights included), the peak KV bytes in RAM, prefill seconds and
decode milliseconds per token, and the ratios of the longest length to the shortest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tiermem.bench.tasks import make_sample, score
from tiermem.engine import GenerationConfig, generate
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import registry
from tiermem.models import load
from tiermem.prompts import build_prompt
from tiermem.units import parse_size


def run(lm, prompt, answers, spec: str, config: GenerationConfig) -> dict:
    name, options = registry.parse_spec(spec)
    result = generate(lm, prompt, registry.build(name, **options), config)
    stats = result.stats
    return {
        "text": result.text,
        "tokens": result.token_ids,
        "correct": score(result.text, answers),
        "peak_rss_mib": stats.peak_rss_bytes / 2**20,
        "kv_peak_mib": stats.kv_bytes_peak / 2**20,
        "kv_disk_mib": int(stats.extra["kv_disk_bytes"]) / 2**20,
        "prefill_s": stats.prefill_seconds,
        "decode_ms": 1000 * stats.decode_seconds / max(stats.decode_steps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--policies", default="infllm,emllm")
    parser.add_argument("--lengths", default="4096,32768")
    parser.add_argument("--kv-memory", default="512MB")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench-out/memory_scaling.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm = load(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    limit = parse_size(args.kv_memory)
    records: dict[str, dict] = {}
    print(
        "| policy | tokens | store | answer ok | peak RSS MiB | KV peak MiB | KV on disk MiB | prefill s "
        "| decode ms/tok |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.policies.split(";") if ";" in args.policies else args.policies.split(","):
        for length in lengths:
            sample = make_sample("passkey", lm.tokenizer, length, 0.5, 0)
            prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
            stores = [("disk", limit)] + ([("ram", None)] if length == max(lengths) else [])
            for store, memory in stores:
                config = GenerationConfig(
                    max_new_tokens=args.new_tokens, stop_on_eos=False, kv_memory=memory, store=StoreConfig(store)
                )
                r = run(lm, prompt, sample.answers, spec, config)
                records[f"{spec}/{length}/{store}"] = r | {"prompt_tokens": prompt.num_tokens}
                print(
                    f"| {spec} | {prompt.num_tokens} | {store}{' ' + args.kv_memory if memory else ''} | "
                    f"{r['correct']} | {r['peak_rss_mib']:.0f} | {r['kv_peak_mib']:.0f} | {r['kv_disk_mib']:.0f} | "
                    f"{r['prefill_s']:.1f} | {r['decode_ms']:.1f} |",
                    flush=True,
                )
        short, long_disk = records[f"{spec}/{min(lengths)}/disk"], records[f"{spec}/{max(lengths)}/disk"]
        long_ram = records[f"{spec}/{max(lengths)}/ram"]
        print(
            f"{spec}: peak RSS {max(lengths)}/{min(lengths)} = "
            f"{long_disk['peak_rss_mib'] / short['peak_rss_mib']:.2f}x, "
            f"decode time per token = {long_disk['decode_ms'] / short['decode_ms']:.2f}x, "
            f"RAM and disk give the same tokens: {long_disk['tokens'] == long_ram['tokens']}",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
