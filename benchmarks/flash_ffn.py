"""Flash FFN loading ("LLM in a flash"): FFN bytes read per decoded token, and what it costs in quality.

    .venv/bin/python benchmarks/flash_ffn.py --model smollm2 --configs 1.0:2,0.75:2,0.5:2,0.5:4,0.35:2,0.25:2 \\
        --out bench-out/flash_ffn.jsonl

For the resident model and each ``density:window`` configuration, in one process on the same inputs:
- **perplexity** on real prose (the Lee news corpus): ``--prefix`` tokens prefilled (every neuron), then the next
  ``--tokens`` tokens fed one at a time (teacher forcing), each scored by the logits before it; this is the
  decoding regime flash loading targets;
- **FFN bytes read per decoded token** from the bundle files, reads (syscalls) per token, and what the resident
  FFNs read from RAM per token (gate, up and down of every layer);
- **passkey accuracy**: ``--passkey-length`` tokens at ``--depths``, greedy, through ``tiermem.engine.generate``;
- decode time per token (machine-dependent; a side note, not the point).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from tiermem.attention import patched_attention
from tiermem.bench.haystack import prose_documents
from tiermem.bench.tasks import make_sample, score
from tiermem.cache import TierCache
from tiermem.engine import GenerationConfig, forward, generate, prefill
from tiermem.memory.full import Full
from tiermem.models import LoadedModel, load
from tiermem.prompts import build_prompt
from tiermem.weights.flash import FlashConfig


def prose_ids(lm: LoadedModel, count: int) -> torch.Tensor:
    text = " ".join(" ".join(doc) for doc in prose_documents()[:40])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :count]
    if ids.shape[1] < count:
        raise SystemExit(f"the prose has only {ids.shape[1]} tokens")
    return ids


def perplexity(lm: LoadedModel, ids: torch.Tensor, prefix: int) -> tuple[float, float]:
    """Perplexity of ``ids[prefix:]`` fed one token at a time; also the seconds per decoded token."""
    cache = TierCache(lm.model, Full())
    nll, start = 0.0, 0.0
    with torch.inference_mode(), patched_attention(lm.model):
        logits = prefill(lm.model, cache, ids[:, :prefix], prefix)
        start = time.perf_counter()
        for i in range(prefix, ids.shape[1]):
            assert logits is not None
            nll += float(torch.logsumexp(logits, -1) - logits[ids[0, i]])
            logits = forward(lm.model, cache, ids[:, i : i + 1])
    steps = ids.shape[1] - prefix
    return float(torch.tensor(nll / steps).exp()), (time.perf_counter() - start) / steps


def passkeys(lm: LoadedModel, length: int, depths: list[float]) -> int:
    found = 0
    for depth in depths:
        sample = make_sample("passkey", lm.tokenizer, length, depth, 0)
        prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
        result = generate(lm, prompt, Full(), GenerationConfig(max_new_tokens=12))
        found += score(result.text, sample.answers)
    return found


def measure(model: str, spec: str | None, args: argparse.Namespace) -> dict[str, Any]:
    if spec is None:
        lm, label = load(model), "resident"
    else:
        density, window = spec.split(":")
        lm = load(model, weights="flash", flash=FlashConfig(float(density), int(window)))
        label = f"flash d={density} w={window}"
    ids = prose_ids(lm, args.prefix + args.tokens)
    lm.reset_weight_stats()
    ppl, seconds = perplexity(lm, ids, args.prefix)
    record: dict[str, Any] = {"model": model, "config": label, "perplexity": ppl, "decode_s_per_token": seconds}
    record.update(lm.weight_stats())
    record["passkeys_found"] = passkeys(lm, args.passkey_length, args.depths)
    record["passkeys_total"] = len(args.depths)
    lm.close()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--configs", default="1.0:2,0.75:2,0.5:2,0.5:4,0.35:2,0.25:2", help="density:window,...")
    parser.add_argument("--prefix", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--passkey-length", type=int, default=512)
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--out", type=Path, default=Path("bench-out/flash_ffn.jsonl"))
    args = parser.parse_args()
    args.depths = [float(d) for d in args.depths.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in [None, *args.configs.split(",")]:
        record = measure(args.model, spec, args)
        rows.append(record)
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    base = rows[0]
    print(f"\n{args.model}: prose {args.prefix} + {args.tokens} tokens; passkeys at {args.passkey_length} tokens")
    print("| config | FFN MiB read / token | vs resident FFN | reads / token | perplexity | vs resident | passkeys |")
    print("|---|---|---|---|---|---|---|")
    resident_ffn = rows[1]["ffn_bytes_per_token_resident"] if len(rows) > 1 else 0
    for r in rows:
        read = r.get("ffn_bytes_read_per_token", resident_ffn)
        print(
            f"| {r['config']} | {read / 2**20:.2f} | {read / resident_ffn:.3f} | {r.get('ffn_reads_per_token', '-')} "
            f"| {r['perplexity']:.2f} | {r['perplexity'] / base['perplexity']:.3f} "
            f"| {r['passkeys_found']}/{r['passkeys_total']} |"
        )


if __name__ == "__main__":
    main()
