"""Question-aware SnapKV variants against full attention on real-prose needles (SmolLM2-135M), 8x and 4x compression.

Each prompt is prefilled once, uncompressed (SnapKV prefills with full attention); each policy compresses a copy
with its own ``end_context`` and decodes greedily. ``--check N``: the first N prompts also through engine.generate,
which must give the same answer and KV bytes. ``--engine``: everything through generate (one prefill per policy).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qaware_compression.py --seed 1 --also snapkv,snapkv-chunk \\
        --policies snapkv,snapkv-chunk,snapkv-sentence,snapkv-sentence:vote=mean,snapkv-chunk:vote=max,\\
snapkv-sentence:shared_heads=false --out bench-out/qaware_compression.jsonl
    .venv/bin/python benchmarks/qaware_compression.py --table bench-out/qaware_compression.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from tiermem.attention import patched_attention
from tiermem.bench.tasks import make_sample, score
from tiermem.cache import TierCache
from tiermem.engine import GenerationConfig, forward, generate, prefill, stop_token_ids, token_pieces
from tiermem.memory import Full
from tiermem.memory.base import Policy
from tiermem.memory.registry import build, parse_spec
from tiermem.memory.snapkv import SnapKV, SnapKVLayer
from tiermem.models import LoadedModel, load
from tiermem.prompts import Prompt, build_prompt

NEW_TOKENS = 16


def make_policy(spec: str, ratio: float, fold: bool) -> Policy:
    """``spec`` is a registry name with options (``snapkv-chunk:kernel_size=5``); ``fold`` counts new tokens in the
    budget, so the KV held while decoding is within ``1 - ratio`` of the prompt's."""
    name, options = parse_spec(spec)
    extra: dict[str, Any] = {"budget_includes_new": True} if fold else {}
    return build(name, compression_ratio=ratio, **extra, **options)


def prefilled(lm: LoadedModel, ids: torch.Tensor, window: int) -> tuple[TierCache, torch.Tensor]:
    """An uncompressed cache of ``ids`` (1, N) that kept the last ``window`` queries of every layer, and the logits
    of the last position."""
    n = ids.shape[1]
    cache = TierCache(lm.model, SnapKV(kv_budget=window + 1, window_size=window), None, None, lm.tokenizer)
    cache.plan(n, n + NEW_TOKENS)
    with torch.inference_mode(), patched_attention(lm.model):
        logits = prefill(lm.model, cache, ids, GenerationConfig().chunk_size)
    assert logits is not None
    return cache, logits


def decode_copy(
    lm: LoadedModel, source: TierCache, logits: torch.Tensor, policy: Policy, pieces: list[str]
) -> tuple[str, int]:
    """Compress a copy of ``source`` under ``policy`` and decode greedily as the engine does; (text, KV bytes)."""
    n = source.get_seq_length()
    cache = TierCache(lm.model, policy, None, None, lm.tokenizer)
    cache.plan(n, n + NEW_TOKENS)
    for layer, src in zip(cache.tier_layers, source.tier_layers, strict=True):
        layer.buffer = copy.deepcopy(src.buffer)
        layer.seen = src.seen
        if isinstance(layer, SnapKVLayer) and isinstance(src, SnapKVLayer) and src.window_queries is not None:
            layer.window_queries = src.window_queries[:, :, -layer.policy.window_size :].clone()
    if policy.needs_token_text:
        cache.observe_tokens(0, pieces)
    stops, ids = stop_token_ids(lm), []
    with torch.inference_mode(), patched_attention(lm.model):
        cache.end_context()
        while (token := int(logits.argmax())) not in stops:
            ids.append(token)
            if len(ids) >= NEW_TOKENS:
                break
            logits = forward(lm.model, cache, torch.tensor([[token]]))
    return lm.tokenizer.decode(ids, skip_special_tokens=True), cache.kv_bytes()


def run_engine(lm: LoadedModel, prompt: Prompt, policy: Policy) -> tuple[str, int]:
    result = generate(lm, prompt, policy, GenerationConfig(max_new_tokens=NEW_TOKENS, question_aware=True))
    return result.text, result.stats.kv_bytes_decode


def table(paths: list[Path]) -> str:
    """Markdown: accuracy per length, points vs full on the same prompts, KV held while decoding vs full's."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines()]

    def prompt_of(row: dict[str, Any]) -> str:
        return "/".join(row["key"].split("/")[:5])  # model, task, seed, length, depth, index

    full = {prompt_of(r): r for r in rows if r["policy"] == "full"}
    lengths = sorted({r["length"] for r in rows})
    lines = [
        "| policy | ratio | budget | "
        + " | ".join(f"{n // 1000}k" for n in lengths)
        + " | all | vs full | KV vs full |",
        "|---|---|---|" + "---|" * len(lengths) + "---|---|---|",
    ]
    groups: dict[tuple[str, float, bool], list[dict[str, Any]]] = {}
    for r in rows:
        if prompt_of(r) in full:
            groups.setdefault((r["policy"], r["ratio"], r["fold"]), []).append(r)
    for (policy, ratio, fold), group in groups.items():
        base = [full[prompt_of(r)] for r in group]
        cells = []
        for n in lengths:
            part = [r["ok"] for r in group if r["length"] == n]
            cells.append(f"{sum(part)}/{len(part)}")
        ok, ref = sum(r["ok"] for r in group), sum(r["ok"] for r in base)
        kv = max(r["kv_bytes_decode"] / b["kv_bytes_decode"] for r, b in zip(group, base, strict=True))
        points = "—" if policy == "full" else f"{100 * (ok - ref) / len(group):+.0f}"
        budget = "—" if policy == "full" else ("includes new" if fold else "prompt only")
        ratio_text = "—" if policy == "full" else f"{1 / (1 - ratio):.0f}x"
        lines.append(
            f"| {policy} | {ratio_text} | {budget} | "
            + " | ".join(cells)
            + f" | {ok}/{len(group)} ({100 * ok / len(group):.0f}%) | {points} | <= 1/{1 / kv:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="2000,4000,6000")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="needle", help="needle, or multikey (three distractor needles)")
    parser.add_argument("--policies", default="snapkv,snapkv-chunk,snapkv-sentence")
    parser.add_argument("--ratios", default="0.875,0.75")
    parser.add_argument("--no-fold", action="store_true", help="kvpress budgets: new tokens come on top")
    parser.add_argument("--also", default="", help="extra policy specs run with kvpress budgets (no fold)")
    parser.add_argument("--ablations", default="", help="extra policy specs run at the first ratio only")
    parser.add_argument("--engine", action="store_true", help="every run through engine.generate")
    parser.add_argument("--check", type=int, default=0, help="first N prompts also through engine.generate")
    parser.add_argument("--out", default="bench-out/qaware_compression.jsonl")
    parser.add_argument("--table", nargs="+", type=Path, help="only print the table of these result files")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    lm = load(args.model)
    runs = [(spec, float(r), not args.no_fold) for spec in args.policies.split(",") for r in args.ratios.split(",")]
    runs += [(spec, float(r), False) for spec in filter(None, args.also.split(",")) for r in args.ratios.split(",")]
    runs += [
        (spec, float(args.ratios.split(",")[0]), not args.no_fold) for spec in filter(None, args.ablations.split(","))
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.exists() else set()
    prompts = [
        (int(length), float(depth), index)
        for length in args.lengths.split(",")
        for depth in args.depths.split(",")
        for index in range(args.samples)
    ]
    for number, (length, depth, index) in enumerate(prompts):
        sample = make_sample(args.task, lm.tokenizer, length, depth, index, args.seed)
        prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
        base = f"{args.model}:{args.task}/s{args.seed}/{length}/{depth}/{index}"
        todo = [("full", 0.0, False), *runs]
        todo = [run for run in todo if f"{base}/{run[0]}/{run[1]}/{run[2]}" not in done]
        if not todo:
            continue
        ids = torch.cat([prompt.context_ids, prompt.question_ids], dim=1)
        policies = [Full() if spec == "full" else make_policy(spec, r, fold) for spec, r, fold in todo]
        if not args.engine:
            window = max((p.window_size for p in policies if isinstance(p, SnapKV)), default=1)
            cache, logits = prefilled(lm, ids, window)
            pieces = token_pieces(cache, ids[0].tolist())
        for (spec, ratio, fold), policy in zip(todo, policies, strict=True):
            if args.engine:
                text, kv_bytes = run_engine(lm, prompt, policy)
            else:
                text, kv_bytes = decode_copy(lm, cache, logits, policy, pieces)
                if number < args.check and (text, kv_bytes) != run_engine(lm, prompt, policy):
                    raise SystemExit(f"{base} {spec}@{ratio}: the engine disagrees: {run_engine(lm, prompt, policy)}")
            row = {
                "key": f"{base}/{spec}/{ratio}/{fold}",
                "length": length,
                "tokens": ids.shape[1],
                "policy": spec,
                "ratio": ratio,
                "fold": fold,
                "ok": score(text, sample.answers),
                "text": text,
                "kv_bytes_decode": kv_bytes,
            }
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row["key"], row["ok"], repr(text[:20]), kv_bytes, flush=True)


if __name__ == "__main__":
    main()
