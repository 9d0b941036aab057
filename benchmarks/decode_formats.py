"""Number formats side by side: perplexity on held-out prose, and decode speed, per weight and KV format.

    # quality: perplexity of held-out Wikipedia prose (the last 20% of the articles tiermem ships), KV read back
    # through the cache in its format at every step of a chunked prefill
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_formats.py ppl --tokens 8192 --window 2048 \
        --out bench-out/formats_ppl.json

    # speed: decode tokens/s with the full cache on one needle prompt, formats interleaved, median of repeats
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_formats.py speed --length 4000 --new-tokens 32 \
        --repeats 3 --out bench-out/formats_speed.json

A format is ``DTYPE/WEIGHTS/KV``: ``--dtype`` (weights and activations), ``--weights-quant`` (``none``, ``int8``,
``int4`` or ``int4-g128``) and ``--kv-dtype``. The first format is the baseline of the ratio columns.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from tiermem.attention import patched_attention
from tiermem.bench.haystack import prose_path
from tiermem.bench.tasks import make_sample
from tiermem.bench.wikitext import wiki_articles
from tiermem.cache import TierCache
from tiermem.decode_step import fused_decoder
from tiermem.engine import GenerationConfig, forward, generate
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import registry
from tiermem.models import LoadedModel, load
from tiermem.prompts import build_prompt

PPL_FORMATS = (
    "float32/none/auto,bfloat16/none/auto,float32/int8/auto,bfloat16/int8/auto,bfloat16/int4/auto,"
    "bfloat16/int4-g128/auto,float32/none/bfloat16,float32/none/float16,float32/none/int8,bfloat16/int8/int8,"
    "bfloat16/int4/int8"
)
SPEED_FORMATS = (
    "float32/none/auto,bfloat16/none/auto,float32/none/int8,bfloat16/int8/auto,bfloat16/int4/auto,"
    "bfloat16/int8/int8,bfloat16/int4/int8"
)


def parse_format(spec: str) -> tuple[str, str, int, str]:
    """``DTYPE/WEIGHTS/KV`` -> (dtype, weights_quant, group, kv_dtype)."""
    dtype, weights, kv = spec.split("/")
    quant, _, group = weights.partition("-g")
    return dtype, quant, int(group) if group else 32, kv


def load_format(model: str, spec: str) -> LoadedModel:
    dtype, quant, group, _ = parse_format(spec)
    return load(model, dtype, weights_quant=quant, quant_group=group)


def heldout_ids(lm: LoadedModel, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of the held-out articles (the last 20%, as ``tiermem tune``'s wiki-lm)."""
    articles = wiki_articles(prose_path().parent)
    text = "\n\n".join(p for _, paragraphs in articles[int(len(articles) * 0.8) :] for p in paragraphs)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"the held-out prose has only {ids.shape[1]} tokens")
    return ids


def fused_nll(lm: LoadedModel, cache: TierCache, ids: torch.Tensor) -> tuple[float, int]:
    """:func:`window_nll` one token at a time through the fused decode step (the first token by a forward)."""
    logits = forward(lm.model, cache, ids[:, :1])
    decoder, why = fused_decoder(lm, [cache])
    if decoder is None:
        raise SystemExit(f"the fused step does not run for this format: {why}")
    total = 0.0
    for i in range(1, ids.shape[1]):
        total += float(torch.nn.functional.cross_entropy(logits[None], ids[0, i : i + 1]))
        if i + 1 < ids.shape[1]:
            logits = decoder.step([cache], [int(ids[0, i])])[0]
    return total, ids.shape[1] - 1


def window_nll(lm: LoadedModel, ids: torch.Tensor, kv_dtype: str, chunk: int, fused: bool = False) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` given the previous tokens, fed ``chunk`` at a time through a
    full-attention TierCache storing KV as ``kv_dtype`` (so every chunk reads the earlier ones in that format);
    ``fused``: one token at a time through the fused decode step."""
    cache = TierCache(lm.model, registry.build("full"), StoreConfig(kv_dtype=kv_dtype))
    cache.plan(ids.shape[1], ids.shape[1])
    total, count = 0.0, 0
    with torch.inference_mode(), patched_attention(lm.model):
        if fused:
            total, count = fused_nll(lm, cache, ids)
        for start in range(0, ids.shape[1] - 1 if not fused else 0, chunk):
            part = ids[:, start : start + chunk]
            logits = forward(lm.model, cache, part, every_position=True)  # (T, vocab) float32
            targets = ids[0, start + 1 : start + 1 + part.shape[1]]
            logits = logits[: targets.shape[0]]
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += targets.shape[0]
    cache.close()
    return total, count


def cmd_ppl(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for spec in args.formats.split(","):
        lm = load_format(args.model, spec)
        ids = heldout_ids(lm, args.tokens)
        nll, count, kv = 0.0, 0, parse_format(spec)[3]
        for start in range(0, args.tokens, args.window):
            window = ids[:, start : start + args.window]
            part_nll, part_count = window_nll(lm, window, kv, args.chunk, args.decode_step == "fused")
            nll, count = nll + part_nll, count + part_count
        rows.append({"format": spec, "weights": lm.weights_format, "tokens": count, "ppl": math.exp(nll / count)})
        print(json.dumps(rows[-1]), flush=True)
        del lm
    base = rows[0]["ppl"]
    print(f"\n{args.model}, held-out Wikipedia prose, {args.tokens} tokens", end="")
    print(f" in windows of {args.window}, chunk {args.chunk}, {args.decode_step} step")
    print("| dtype / weights / KV | perplexity | vs first |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['format']} | {row['ppl']:.3f} | {100 * (row['ppl'] / base - 1):+.2f}% |")
    return rows


def cmd_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = args.formats.split(",")
    models = {spec: load_format(args.model, spec) for spec in specs}
    first = models[specs[0]]
    sample = make_sample("needle", first.tokenizer, args.length, 0.5, 0)
    prompt = build_prompt(first, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}

    def config(spec: str, new_tokens: int) -> GenerationConfig:
        store = StoreConfig(kv_dtype=parse_format(spec)[3])
        return GenerationConfig(max_new_tokens=new_tokens, stop_on_eos=False, store=store)

    for spec in specs:  # an untimed warm-up per format (first calls of each kernel)
        generate(models[spec], build_prompt(models[spec], "warm up", "ok"), registry.build("full"), config(spec, 4))
    for _ in range(args.repeats):
        for spec in specs:
            result = generate(models[spec], prompt, registry.build("full"), config(spec, args.new_tokens))
            runs[spec].append(result.stats.to_dict() | {"text": result.text})
    rows = []
    for spec in specs:
        median = statistics.median(r["decode_tokens_per_second"] for r in runs[spec])
        rows.append(
            {
                "format": spec,
                "decode_tokens_per_second": median,
                "kv_bytes_decode": runs[spec][0]["kv_bytes_decode"],
                "text": runs[spec][0]["text"],
                "runs": runs[spec],
            }
        )
    base = rows[0]["decode_tokens_per_second"]
    print(f"{args.model}, prompt {prompt.num_tokens} tokens, full cache, {args.new_tokens} new tokens, ", end="")
    print(f"median of {args.repeats}, {torch.get_num_threads()} threads")
    print("| dtype / weights / KV | decode tok/s | vs first | KV at decode MiB | answer |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['format']} | {row['decode_tokens_per_second']:.1f} | {row['decode_tokens_per_second'] / base:.2f}x"
            f" | {row['kv_bytes_decode'] / 2**20:.1f} | {row['text'].strip()[:24]!r} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity on held-out prose per format")
    ppl.add_argument("--formats", default=PPL_FORMATS)
    ppl.add_argument("--tokens", type=int, default=8192)
    ppl.add_argument("--window", type=int, default=2048, help="tokens per independent window (fresh cache)")
    ppl.add_argument("--chunk", type=int, default=256, help="tokens per forward inside a window")
    ppl.add_argument("--decode-step", choices=["python", "fused"], default="python", help="fused: token by token")
    speed = sub.add_parser("speed", help="decode tokens/s per format (full cache, one needle prompt)")
    speed.add_argument("--formats", default=SPEED_FORMATS)
    speed.add_argument("--length", type=int, default=4000)
    speed.add_argument("--new-tokens", type=int, default=32)
    speed.add_argument("--repeats", type=int, default=3)
    for command in (ppl, speed):
        command.add_argument("--model", default="smollm2")
        command.add_argument("--threads", type=int, default=2)
        command.add_argument("--out", help="JSON file for the rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = cmd_ppl(args) if args.command == "ppl" else cmd_speed(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
