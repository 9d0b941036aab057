"""KV allocation strategies over a 16k-token run: concatenation, geometric growth, demand paging.

    .venv/bin/python benchmarks/paged_alloc.py --prompt-tokens 15360 --new-tokens 1024 --out bench-out/paged_alloc.json

One prompt (SmolLM2, ``full`` attention run past its trained positions: the outputs are not the point, the memory
traffic is) is prefilled in 512-token chunks and decoded token by token under each allocator:

- ``concat``: a new block of exactly the new length on every append (transformers' DynamicCache does ``torch.cat``);
- ``grow``: tiermem's default, a preallocated block growing by 1.25x (here sized up front from the plan);
- ``paged``: one virtual reservation per layer (``mmap`` with ``MAP_NORESERVE``), pages committed on first write.

Reports block allocations (summed over layers), KV bytes held at the end, peak RSS, prefill seconds and decode
milliseconds per token. The planned run lets ``grow`` reserve exactly; ``grow-unplanned`` shows it without the plan.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import prefill
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import Full
from tiermem.memory.layer import DenseLayer
from tiermem.models import load
from tiermem.stats import Stopwatch, peak_rss_bytes, reset_peak_rss


def measure(model, ids: torch.Tensor, new_tokens: int, allocator: str, planned: bool) -> dict:
    cache = TierCache(model, Full(extrapolate=True), StoreConfig(allocator=allocator))
    if planned:
        cache.plan(ids.shape[1], ids.shape[1] + new_tokens)
    prefill_clock, decode_clock = Stopwatch(), Stopwatch()
    reset_peak_rss()
    with torch.inference_mode(), patched_attention(model):
        with prefill_clock:
            logits = prefill(model, cache, ids, 512)
        assert logits is not None
        token = torch.tensor([[int(logits.argmax())]])
        with decode_clock:
            for step in range(new_tokens):
                position = torch.tensor([[ids.shape[1] + step]])
                out = model(input_ids=token, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    layers = [layer for layer in cache.tier_layers if isinstance(layer, DenseLayer)]
    return {
        "allocations": sum(layer.buffer.reallocations for layer in layers),
        "kv_mib_end": cache.kv_bytes() / 2**20,
        "kv_mib_peak": cache.kv_bytes_peak() / 2**20,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "prefill_s": prefill_clock.seconds,
        "decode_ms": 1000 * decode_clock.seconds / new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, default=15360)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--allocators", default="concat,grow,grow-unplanned,paged")
    parser.add_argument("--out", default="bench-out/paged_alloc.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm = load(args.model)
    ids = torch.randint(
        100, lm.model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    results = {}
    print(f"{args.prompt_tokens} prompt tokens + {args.new_tokens} decoded, full attention, 2 threads")
    print("| allocator | block allocations | KV MiB at end | KV peak MiB | peak RSS MiB | prefill s | decode ms/tok |")
    print("|---|---|---|---|---|---|---|")
    for name in args.allocators.split(","):
        allocator, _, unplanned = name.partition("-")
        r = measure(lm.model, ids, args.new_tokens, allocator, planned=not unplanned)
        results[name] = r
        print(
            f"| {name} | {r['allocations']} | {r['kv_mib_end']:.0f} | {r['kv_mib_peak']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['prefill_s']:.1f} | {r['decode_ms']:.1f} |",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
