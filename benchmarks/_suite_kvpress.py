"""kvpress side of ``kvpress_suite.py`` (runs inside ``.venv-kvpress``): kvpress 0.5.5's presses on the suite.

One uncompressed prefill per prompt, then every press replayed on a copy of its cache. kvpress compresses in a
forward hook that runs after each attention layer's forward, during the one prefill forward; the layer's output
(and so every later layer's input) was computed over the full context before the hook prunes the cache. So the
hook's inputs (``hidden_states``, the layer's keys and values, ``position_embeddings``, ``cache_position``) do not
depend on the press, and calling ``press.forward_hook`` afterwards, layer by layer, with the recorded inputs and a
copy of the cache, leaves the cache exactly as ``with press(model): model.model(context)`` does. ``--check``
verifies that on a 1k-token prefix of the first prompt (identical keys, values and AdaKV masks, per press).

Press specs: ``none`` (kvpress's no-press baseline), ``snapkv``, ``expected`` (``ExpectedAttentionPress()``),
``adakv-expected`` (``AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))``: kvpress's leaderboard
``expected_attention``), ``knorm``, ``tova``, ``streaming``, ``pyramidkv``, ``adakv-snapkv``; all at kvpress's
defaults. kvpress's AdaKV keeps every head's cache and masks the dropped keys during decoding (no memory saved): its
rows count the kept tokens, not the stored ones.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from _kvpress_harness import append_row, kvpress_answer, kvpress_load, load_jsonl, log, row_header, score_metric

PRESSES = ("none", "snapkv", "expected", "adakv-expected", "knorm", "tova", "streaming", "pyramidkv", "adakv-snapkv")


def make_press(name: str, ratio: float) -> Any:
    import kvpress as kp

    presses = {
        "snapkv": lambda: kp.SnapKVPress(compression_ratio=ratio),
        "expected": lambda: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "adakv-expected": lambda: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=ratio, epsilon=1e-2)),
        "knorm": lambda: kp.KnormPress(compression_ratio=ratio),
        "tova": lambda: kp.TOVAPress(compression_ratio=ratio),
        "streaming": lambda: kp.StreamingLLMPress(compression_ratio=ratio),
        "pyramidkv": lambda: kp.PyramidKVPress(compression_ratio=ratio),
        "adakv-snapkv": lambda: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio)),
    }
    if name == "none":
        return None
    if name not in presses:
        raise SystemExit(f"unknown kvpress press '{name}' ({', '.join(PRESSES)})")
    return presses[name]()


def attention_modules(model: Any) -> list[Any]:
    return [layer.self_attn for layer in model.model.layers]


def prefill_recorded(model: Any, ids: Any) -> tuple[Any, list[tuple[Any, dict[str, Any], tuple[Any, Any]]]]:
    """One uncompressed prefill forward of ``ids`` (1, N) as kvpress's pipeline runs it (``model.model(...)``);
    returns the cache and, per attention layer, what its forward hook would receive (module, kwargs, output)."""
    import torch
    from transformers import DynamicCache

    recorded: list[tuple[Any, dict[str, Any], tuple[Any, Any]]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        kept = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        recorded.append((module, kept, (None, output[1])))  # output[0] is never read by a press

    cache = DynamicCache()
    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, past_key_values=cache)
    finally:
        for h in hooks:
            h.remove()
    return cache, recorded


def replay(model: Any, press: Any, cache: Any, recorded: list[tuple[Any, dict[str, Any], tuple[Any, Any]]]) -> Any:
    """A copy of the uncompressed ``cache`` compressed by ``press`` exactly as during a real prefill."""
    import torch

    compressed = copy.deepcopy(cache)
    for module in attention_modules(model):
        module.masked_key_indices = None  # kvpress's attention patch resets it at every prefill; AdaKV sets it
    if press is None:
        return compressed
    with torch.no_grad(), press(model):  # registers hooks that never fire here; runs post_init_from_model
        for module, kwargs, output in recorded:
            press.forward_hook(module, [], {**kwargs, "past_key_values": compressed}, output)
    return compressed


def kept_per_layer(model: Any, cache: Any) -> list[float]:
    """Context tokens each layer keeps per KV head: the cache's length, less AdaKV's masked keys (head average)."""
    out = []
    for i, module in enumerate(attention_modules(model)):
        length = cache.layers[i].keys.shape[-2]
        masked = getattr(module, "masked_key_indices", None)
        heads = cache.layers[i].keys.shape[1]
        out.append(length - (len(masked[2]) / heads if masked is not None else 0.0))
    return out


def check_replay(model: Any, sample: dict[str, Any], specs: list[str], ratio: float, tokens: int) -> list[dict]:
    """Replayed vs real (``with press(model)``) compression on the first ``tokens`` context tokens of ``sample``."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([sample["context_ids"][:tokens]])
    base, recorded = prefill_recorded(model, ids)
    results = []
    for spec in specs:
        if spec == "none":
            continue
        replayed = replay(model, make_press(spec, ratio), base, recorded)
        masks_replayed = [getattr(m, "masked_key_indices", None) for m in attention_modules(model)]
        real = DynamicCache()
        with torch.no_grad(), make_press(spec, ratio)(model):
            model.model(input_ids=ids, past_key_values=real)
        masks_real = [getattr(m, "masked_key_indices", None) for m in attention_modules(model)]
        same = all(
            torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            for a, b in zip(replayed.layers, real.layers, strict=True)
        )
        same_masks = all(
            (a is None and b is None) or (a is not None and b is not None and all(map(torch.equal, a, b)))
            for a, b in zip(masks_replayed, masks_real, strict=True)
        )
        results.append({"press": spec, "ratio": ratio, "tokens": tokens, "identical": same and same_masks})
        log(f"replay check {spec}@{ratio} on {tokens} tokens: identical={same and same_masks}")
    return results


def done_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["system"], r["policy"], r["compression_ratio"], r["task"], r["length"], r["index"])


def run(out: Path, samples: list[dict[str, Any]], cells: list[tuple[str, float]], check: int) -> None:
    """Append one row per (press, ratio, sample) missing from ``out/results.jsonl``."""
    import kvpress
    import torch
    import transformers

    results = out / "results.jsonl"
    model, tokenizer, source = kvpress_load(out)
    versions = {"kvpress": "0.5.5", "transformers": transformers.__version__, "torch": torch.__version__}
    log(
        f"kvpress worker: {versions}, model from {source}, attn {model.config._attn_implementation}, {kvpress.__name__}"
    )
    if check and samples:
        for row in check_replay(model, samples[0], sorted({c[0] for c in cells}), 0.5, check):
            append_row({**row, "versions": versions}, out / "replay-check.jsonl")
    for s in samples:
        done = {done_key(r) for r in load_jsonl(results)}  # read per prompt: another worker may have answered it
        todo = [(p, r) for p, r in cells if ("kvpress", p, r, s["task"], s["length"], s["index"]) not in done]
        if not todo:
            continue
        context = torch.tensor([s["context_ids"]])
        question = torch.tensor([s["question_ids"]])
        start = time.perf_counter()
        base, recorded = prefill_recorded(model, context)
        prefill_seconds = time.perf_counter() - start
        for spec, ratio in todo:
            press = make_press(spec, ratio)
            cache = replay(model, press, base, recorded)
            kept = kept_per_layer(model, cache)
            try:
                answer = kvpress_answer(model, tokenizer, cache, context.shape[1], question, s["max_new_tokens"])
            except RuntimeError as error:  # e.g. PyramidKV's layers of unequal lengths vs transformers' one mask
                failure = {"system": "kvpress", "policy": spec, "compression_ratio": ratio, "task": s["task"]}
                append_row({**failure, "index": s["index"], "error": str(error)[:300]}, out / "errors.jsonl")
                log(f"kvpress {spec}@{ratio} {s['task']} #{s['index']} failed: {error}")
                continue
            row: dict[str, Any] = {
                **row_header("kvpress", spec, ratio, s, s["context_ids"], s["question_ids"], "tiermem", repr(press)),
                **answer,
                "score": score_metric(answer["output"], s["answers"], s["metric"]),
                "kept_per_layer": kept,
                "kv_tokens": max(kept),
                "shared_prefill_seconds": prefill_seconds,
                "versions": versions,
            }
            append_row(row, results)
            log(f"kvpress {spec}@{ratio} {s['task']} #{s['index']}: {answer['output'][:60]!r} score={row['score']:.2f}")
        del base, recorded
