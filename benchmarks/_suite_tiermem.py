"""tiermem side of ``kvpress_suite.py`` (runs inside ``.venv``): prompt export and tiermem's policies on the suite.

The score-and-evict policies (and SnapKV, StreamingLLM without prefill eviction, full attention) read the whole
context with full attention and compress once, in ``end_context``; what they gather on the way (the last rotated
queries, pre-RoPE query moments past the first 4 tokens) does not change the prefill. So each prompt is prefilled
once under a collector that gathers all of it, and each policy compresses a copy (:func:`fork`), then reads the
question and decodes as :func:`tiermem.engine.generate` does. ``--check N`` runs each policy through ``generate``
on an N-token prefix of the first prompt and records whether text and KV bytes agree with the fork.

Left out: ``observed-attention`` (its prefill uses explicit softmax attention, so it needs its own) and the
faithful ``streaming`` (it evicts during the prefill); ``streaming:rerotate=false+evict_during_prefill=false`` is
kvpress's StreamingLLMPress (full prefill, then sinks + recent tokens at their original positions).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _kvpress_harness import append_row, git_head, load_jsonl, log, row_header, score_metric, tiermem_source_digest

from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import GenerationConfig, forward, generate, prefill, probe_question, stop_token_ids, token_pieces
from tiermem.memory.base import Policy
from tiermem.memory.registry import build
from tiermem.memory.registry import parse_spec as registry_spec
from tiermem.memory.scorer import ScorerLayer, ScorerPolicy
from tiermem.memory.snapkv import SnapKVLayer
from tiermem.models import LoadedModel, load
from tiermem.prompts import Prompt, build_prompt

COLLECT_WINDOW = 64  # the longest observation window of the forked policies (kvpress's SnapKV defaults)
COLLECT_SINKS = 4  # Expected Attention's n_sink: its query moments skip these tokens


@dataclass
class Collector(ScorerPolicy):
    """Gathers what every forked policy scores with; never compresses (its ``end_context`` is not called)."""

    name = "collector"
    needs_query_stats = True

    def query_window(self) -> int:
        return COLLECT_WINDOW

    def protect_first(self) -> int:
        return COLLECT_SINKS

    def score(self, layer: ScorerLayer) -> torch.Tensor:
        raise NotImplementedError("the collector only gathers")


def export(path: Path, tasks: list[str], lengths: list[int], samples: int, seed: int, cap: int) -> None:
    """Write the suite's samples with tiermem's token ids, one JSON line each (the prompts both systems answer)."""
    from tiermem.bench.ruler import make_ruler_sample, tokens_to_generate

    lm = load("smollm2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for length in lengths:
            for task in tasks:
                for index in range(samples):
                    s = make_ruler_sample(task, lm.tokenizer, length, index, seed)
                    prompt = build_prompt(lm, s.context, s.question, "auto", s.answer_prefix)
                    row = {
                        "model": "smollm2",
                        "task": task,
                        "length": length,
                        "depth": None,
                        "index": index,
                        "seed": seed,
                        "context": s.context,
                        "question": s.question,
                        "answer_prefix": s.answer_prefix,
                        "answers": list(s.answers),
                        "metric": s.metric,
                        "max_new_tokens": min(tokens_to_generate(task), cap) if cap else tokens_to_generate(task),
                        "style": prompt.style,
                        "context_ids": prompt.context_ids[0].tolist(),
                        "question_ids": prompt.question_ids[0].tolist(),
                    }
                    handle.write(json.dumps(row) + "\n")
                    log(f"exported {task} {length} #{index}: {prompt.num_tokens} tokens")


def make_policy(spec: str, ratio: float) -> Policy:
    name, options = registry_spec(spec.replace("+", ","))
    return build(name, **options) if name == "full" else build(name, compression_ratio=ratio, **options)


def collect(lm: LoadedModel, context: torch.Tensor, total: int) -> tuple[TierCache, torch.Tensor]:
    """The uncompressed, gathered cache of ``context`` (1, N) and the logits of its last position."""
    cache = TierCache(lm.model, Collector(kv_budget=context.shape[1] + 1), None, None, lm.tokenizer)
    cache.plan(context.shape[1], total)
    with torch.inference_mode(), patched_attention(lm.model):
        logits = prefill(lm.model, cache, context, GenerationConfig().chunk_size)
    assert logits is not None
    return cache, logits


def fork(lm: LoadedModel, source: TierCache, policy: Policy, context_ids: list[int], total: int) -> TierCache:
    """A cache of ``policy`` holding a copy of what ``source`` gathered, compressed (``end_context``)."""
    cache = TierCache(lm.model, policy, None, None, lm.tokenizer)
    cache.plan(len(context_ids), total)
    for layer, src in zip(cache.tier_layers, source.tier_layers, strict=True):
        assert isinstance(src, ScorerLayer)
        layer.buffer = copy.deepcopy(src.buffer)  # type: ignore[attr-defined]
        layer.seen = src.seen
        window = 0
        if isinstance(layer, ScorerLayer):
            window = layer.policy.query_window()
            if layer.policy.needs_query_stats:
                if layer.policy.protect_first() != COLLECT_SINKS:
                    raise SystemExit(f"{policy.name}: query moments gathered past {COLLECT_SINKS} sinks only")
                layer.query_count = src.query_count
                layer.query_sum, layer.query_outer = src.query_sum.clone(), src.query_outer.clone()  # type: ignore[union-attr]
            if layer.policy.needs_attention_sums:
                raise SystemExit(f"{policy.name} needs its own prefill (attention sums)")
        elif isinstance(layer, SnapKVLayer):
            window = layer.policy.window_size
        if window and src.window_queries is not None:
            if window > COLLECT_WINDOW:
                raise SystemExit(f"{policy.name}: window {window} > {COLLECT_WINDOW} gathered")
            layer.window_queries = src.window_queries[:, :, -window:].clone()  # type: ignore[attr-defined]
    if policy.needs_token_text:
        cache.observe_tokens(0, token_pieces(cache, context_ids))
    with torch.inference_mode(), patched_attention(lm.model):
        cache.end_context()
    return cache


def answer(
    lm: LoadedModel, cache: TierCache, context: torch.Tensor, question: torch.Tensor, logits: torch.Tensor, new: int
) -> str:
    """Probe (if the policy does), read the question, decode greedily to EOS or ``new`` tokens: engine._run's steps."""
    stops, ids = stop_token_ids(lm), []
    with torch.inference_mode(), patched_attention(lm.model):
        if cache.policy.probes_question:
            probe_question(lm.model, cache, context, question)
        if question.shape[1]:
            logits = prefill(lm.model, cache, question, GenerationConfig().chunk_size, logits)
        while (token := int(logits.argmax())) not in stops:
            ids.append(token)
            if len(ids) >= new:
                break
            if cache.policy.needs_token_text:
                cache.observe_tokens(cache.get_seq_length(), token_pieces(cache, [token]))
            logits = forward(lm.model, cache, torch.tensor([[token]]))
    return str(lm.tokenizer.decode(ids, skip_special_tokens=True))


def parts(s: dict[str, Any], question_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    context, question = torch.tensor([s["context_ids"]]), torch.tensor([s["question_ids"]])
    return (torch.cat([context, question], dim=1), question[:, :0]) if question_aware else (context, question)


def check(lm: LoadedModel, s: dict[str, Any], cells: list[tuple[str, float]], qaware: bool, tokens: int) -> list[dict]:
    """Fork vs ``generate`` on the first ``tokens`` context tokens of ``s`` (16 new tokens), one row per policy."""
    s = {**s, "context_ids": s["context_ids"][:tokens]}
    context, question = parts(s, qaware)
    total = context.shape[1] + question.shape[1] + 16
    source, logits = collect(lm, context, total)
    rows = []
    for spec in sorted({spec for spec, _ in cells}):
        policy = make_policy(spec, 0.5)
        cache = fork(lm, source, policy, context[0].tolist(), total)
        text = answer(lm, cache, context, question, logits, 16)
        prompt = Prompt(torch.tensor([s["context_ids"]]), torch.tensor([s["question_ids"]]), "chat")
        ref = generate(lm, prompt, make_policy(spec, 0.5), GenerationConfig(max_new_tokens=16, question_aware=qaware))
        same = text == ref.text and cache.kv_bytes() == ref.stats.kv_bytes_decode
        rows.append({"policy": spec, "question_aware": qaware, "tokens": tokens, "identical": same})
        log(f"fork check {spec} (question-aware {qaware}): {text!r} vs generate {ref.text!r}, same={same}")
    return rows


def done_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["system"], r["policy"], r["compression_ratio"], r["task"], r["length"], r["index"])


def run(out: Path, samples: list[dict[str, Any]], cells: list[tuple[str, float]], qaware: bool, checks: int) -> None:
    """Append one row per (policy, ratio, sample) missing from ``out/results.jsonl``."""
    system = "tiermem-qaware" if qaware else "tiermem"
    results = out / "results.jsonl"
    lm = load("smollm2")
    versions = {"tiermem_src": tiermem_source_digest(), "git_head": git_head(), "torch": torch.__version__}
    log(f"{system} worker: {versions}, model from {lm.source}")
    if checks and samples:
        for row in check(lm, samples[0], cells, qaware, checks):
            append_row({**row, "versions": versions}, out / "fork-check.jsonl")
    for s in samples:
        done = {done_key(r) for r in load_jsonl(results)}  # read per prompt: another worker may have answered it
        todo = [(p, r) for p, r in cells if (system, p, r, s["task"], s["length"], s["index"]) not in done]
        if not todo:
            continue
        context, question = parts(s, qaware)
        total = context.shape[1] + question.shape[1] + s["max_new_tokens"]
        source, logits = collect(lm, context, total)
        for spec, ratio in todo:
            policy = make_policy(spec, ratio)
            cache = fork(lm, source, policy, context[0].tolist(), total)
            kept = [layer.kv_tokens() for layer in cache.tier_layers]
            text = answer(lm, cache, context, question, logits, s["max_new_tokens"])
            row: dict[str, Any] = {
                **row_header(system, spec, ratio, s, s["context_ids"], s["question_ids"], "tiermem", repr(policy)),
                "output": text,
                "score": score_metric(text, s["answers"], s["metric"]),
                "kept_per_layer": kept,
                "kv_tokens": max(kept),
                "kv_bytes_decode": cache.kv_bytes(),
                "versions": versions,
            }
            append_row(row, results)
            log(f"{system} {spec}@{ratio} {s['task']} #{s['index']}: {text[:60]!r} score={row['score']:.2f}")
            cache.close()
        source.close()
