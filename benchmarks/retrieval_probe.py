"""Where does the needle's block rank? InfLLM's mean-query scoring against max-over-tokens scoring, per layer and head.

For needle-in-prose prompts (tiermem's ``needle`` task), runs ``infllm-small``'s geometry up to the question, then
probes the question (storing nothing) and ranks the block holding the needle's number among all blocks in memory:

- ``mean``: InfLLM's retrieval for the question's execution block: the mean question query, rotated at the fixed
  angle, against each block's representative key (the mean of its 4 most-attended keys), per layer;
- ``max``: per query head, the max over question tokens and block tokens of the pre-RoPE q.k
  (:func:`tiermem.memory.retrieval_heads.block_scores`);
- ``heads``: the combined vote of the model's calibrated retrieval heads (what ``infllm-heads`` retrieves by).

    .venv/bin/python benchmarks/retrieval_probe.py --length 4096 --depths 0.1,0.3,0.5,0.7,0.9
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tiermem.attention import patched_attention
from tiermem.bench.tasks import make_sample
from tiermem.cache import TierCache
from tiermem.engine import prefill, probe_question
from tiermem.memory import registry
from tiermem.memory.context_memory import ContextMemoryLayer
from tiermem.memory.retrieval_heads import RetrievalHeads, block_scores, combine, retrieval_heads
from tiermem.models import load
from tiermem.prompts import build_prompt
from tiermem.rope import apply_rope


def needle_block(layer: ContextMemoryLayer, ids: list[int], value_ids: list[int]) -> int:
    """Id of the block holding the first token of the needle's number."""
    n = len(value_ids)
    pos = next(i for i in range(len(ids) - n + 1) if ids[i : i + n] == value_ids)
    return next(b for b, s in enumerate(layer.block_starts) if s <= pos < s + layer.block_sizes[b])


def rank(scores: torch.Tensor, target: int) -> int:
    """0 = first; ties count against the target."""
    return int((scores >= scores[target]).sum()) - 1


def probe_sample(lm, length: int, depth: float, index: int, heads: RetrievalHeads) -> dict[str, object]:  # type: ignore[no-untyped-def]
    sample = make_sample("needle", lm.tokenizer, length, depth, index)
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    policy = registry.build("infllm-heads")
    config = lm.model.config
    all_heads = [(i, h) for i in range(config.num_hidden_layers) for h in range(config.num_attention_heads)]
    everything = RetrievalHeads(all_heads, [], 0)
    object.__setattr__(policy, "_heads", everything)
    policy.prepare = lambda model, tokenizer: None  # type: ignore[method-assign]  # keep every head recorded
    cache = TierCache(lm.model, policy, tokenizer=lm.tokenizer)
    layers = [x for x in cache.tier_layers if isinstance(x, ContextMemoryLayer)]
    shared = layers[0].shared
    assert shared is not None
    recorded: dict[int, torch.Tensor] = {}
    original = shared.record
    shared.record = lambda i, q: (recorded.__setitem__(i, q[0].float()), original(i, q))  # type: ignore[method-assign]
    with torch.inference_mode(), patched_attention(lm.model):
        prefill(lm.model, cache, prompt.context_ids, 512)
        probe_question(lm.model, cache, prompt.context_ids, prompt.question_ids)
    value_ids = lm.tokenizer(sample.answers[0], add_special_tokens=False).input_ids
    target = needle_block(layers[0], prompt.context_ids[0].tolist(), value_ids)
    mean_ranks, max_ranks, head_scores = [], [], {}
    for layer in layers:
        q = recorded[layer.info.layer_idx]  # (Hq, T, D) pre-RoPE
        cos, sin = layer.info.rope.cos_sin_range(layer.policy.n_local - 1, 1)
        query = apply_rope(q, cos.float(), sin.float()).mean(dim=1).reshape(-1)
        mean_ranks.append(rank(layer.reprs.float() @ query, target))
        keys = layer.all_block_keys()
        group = layer.info.group_size
        per_head = [block_scores(q[h], keys[h // group], list(layer.block_sizes)) for h in range(q.shape[0])]
        head_scores.update({(layer.info.layer_idx, h): s for h, s in enumerate(per_head)})
        max_ranks.append(min(rank(s, target) for s in per_head))
    chosen = combine([head_scores[h] for h in heads.heads])
    cache.close()
    return {"blocks": len(layers[0].block_sizes), "mean": mean_ranks, "max": max_ranks, "heads": rank(chosen, target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args()
    lm = load("smollm2")
    heads = retrieval_heads(lm.model, lm.tokenizer, 8)
    print(f"calibrated retrieval heads (layer, head): {heads.heads}")
    rows = [
        probe_sample(lm, args.length, float(d), i, heads) for d in args.depths.split(",") for i in range(args.samples)
    ]
    blocks = statistics.median(int(r["blocks"]) for r in rows)  # type: ignore[call-overload]
    print(f"{len(rows)} prompts of {args.length} tokens, ~{blocks:.0f} blocks in memory per layer")
    print("layer | mean-query rank (median) | best head's max rank (median) | rank 0 under max, prompts")
    for layer in range(len(rows[0]["mean"])):  # type: ignore[arg-type]
        means = [r["mean"][layer] for r in rows]  # type: ignore[index]
        maxes = [r["max"][layer] for r in rows]  # type: ignore[index]
        print(
            f"{layer:5d} | {statistics.median(means):6.0f} | {statistics.median(maxes):6.0f} | "
            f"{sum(m == 0 for m in maxes)}/{len(rows)}"
        )
    print(f"calibrated heads combined: ranks {[r['heads'] for r in rows]}")


if __name__ == "__main__":
    main()
