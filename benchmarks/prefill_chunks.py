"""Prefill time against the prefill chunk size, full attention, one prompt; with ``--compare``, the causal prefill
fast path (:mod:`tiermem.prefill_attention`) against the masked path it replaces and against one plain causal
forward of the whole prompt (transformers' SDPA with a ``DynamicCache``: what kvpress's pipeline runs).

    .venv/bin/python benchmarks/prefill_chunks.py --length 4096 --chunks 512,1024,2048,4096 --repeats 2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prefill_chunks.py --length 4096 --chunks 512 --repeats 3 --compare \
        --kv-dtype auto,int8
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prefill_chunks.py --length 2048 --chunks 512 --compare \
        --formats fast --kv-dtype int8        # the default formats; the single forward runs the same model

Chunks bound the activation memory; this shows what they cost or save in time. Every configuration runs once per
repeat, interleaved, and the table shows the median; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

import tiermem.prefill_attention as fast_path
from tiermem.bench.tasks import make_sample
from tiermem.engine import GenerationConfig, generate
from tiermem.formats import apply_preset
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import build
from tiermem.models import LoadedModel, load
from tiermem.prompts import Prompt, build_prompt


def tiermem_prefill(lm: LoadedModel, prompt: Prompt, chunk: int, kv_dtype: str, fast: bool) -> float:
    fast_path.ENABLED = fast
    try:
        config = GenerationConfig(max_new_tokens=2, chunk_size=chunk, store=StoreConfig(kv_dtype=kv_dtype))
        return generate(lm, prompt, build("full"), config).stats.prefill_seconds
    finally:
        fast_path.ENABLED = True


@torch.inference_mode()
def single_forward(lm: LoadedModel, prompt: Prompt) -> float:
    """One causal forward over the whole prompt, as transformers runs it (no tiermem attention)."""
    ids = torch.cat([prompt.context_ids, prompt.question_ids], dim=1)
    began = time.perf_counter()
    lm.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--chunks", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="fast path vs masked path vs one causal forward")
    parser.add_argument("--kv-dtype", default="auto", help="comma-separated KV formats (auto, bfloat16, int8, ...)")
    parser.add_argument("--formats", default="exact", choices=["exact", "fast"], help="the model's number formats")
    args = parser.parse_args()
    preset = argparse.Namespace(formats=args.formats, dtype=None, weights_quant=None, kv_dtype="auto")
    apply_preset(preset)
    lm = load(args.model, preset.dtype, weights_quant=preset.weights_quant)
    print(f"formats: {lm.weights_format} weights, {preset.dtype} activations")
    sample = make_sample("needle", lm.tokenizer, args.length, 0.5, 0)
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    configs = [
        (f"chunk {chunk}, KV {kv}" + (", fast path" if fast else ", masked" if args.compare else ""), chunk, kv, fast)
        for chunk in (int(c) for c in args.chunks.split(","))
        for kv in args.kv_dtype.split(",")
        for fast in ((True, False) if args.compare else (True,))
    ]
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    if args.compare:
        times["one causal forward (transformers SDPA)"] = []
    for _ in range(args.repeats):
        for name, chunk, kv, fast in configs:
            times[name].append(tiermem_prefill(lm, prompt, chunk, kv, fast))
        if args.compare:
            times["one causal forward (transformers SDPA)"].append(single_forward(lm, prompt))
    print(f"{args.model}, {prompt.num_tokens} prompt tokens, {torch.get_num_threads()} threads, prefill seconds")
    print("| configuration | median s | runs |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {statistics.median(seconds):.2f} | " + " ".join(f"{s:.2f}" for s in seconds) + " |")


if __name__ == "__main__":
    main()
