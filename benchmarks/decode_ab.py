"""One part of the decode step swapped, A/B in one process, step by step interleaved.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_ab.py --length 512 --rounds 60 \
        --variants head-int8,head-fp16,head-half --out bench-out/decode_ab.json

This VM's speed drifts by up to 1.3x between consecutive runs of the same code, so a difference of a few percent
between two processes is noise. Here the model (SmolLM2 in the default formats, full cache) is loaded once and each
round runs one decode step under every variant in turn, the order rotating each round; the table gives each variant's
median step time and its ratio to the first. The cache grows by one token per step for all variants alike.

Variants (each swaps one part and puts it back):

- ``head-int8``: the LM head on PyTorch's weight-only int8 kernel (the defaults);
- ``head-fp16``: the head in float16 on fbgemm's fp16 GEMM (``quantized::linear_dynamic_fp16``), float32 logits;
- ``head-half``: the head in float16 through ``F.linear`` in float16 (oneDNN), logits widened to float32;
- ``norm-rms``: every RMSNorm as one ``torch.rms_norm`` call; ``norm-ln``: as LayerNorm over ``[x, -x]`` (defaults);
- ``fused``: the defaults' compiled decode step (``tiermem.decode_step``) instead of the model's forward (the
  ``head-int8`` variant is the Python step); both read and extend the same cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.decode_step import fused_decoder
from tiermem.engine import forward_token, prefill
from tiermem.formats import apply_preset
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import build
from tiermem.models import load
from tiermem.norms import _one_call
from tiermem.weights.quant import Int8WeightOnlyLinear


class FbgemmFp16Head(nn.Module):
    """The head in float16 on fbgemm's fp16 GEMM (float32 arithmetic and logits), packed 16384 rows at a time (the
    packer takes float32). fbgemm pads the input dimension to whole blocks of 512: SmolLM2's 576 packs as 1024."""

    def __init__(self, weight: torch.Tensor, block_rows: int = 16384):
        super().__init__()
        self.packed = [
            torch.ops.quantized.linear_prepack_fp16(weight[start : start + block_rows].float(), None)
            for start in range(0, weight.shape[0], block_rows)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        out = torch.cat([torch.ops.quantized.linear_dynamic_fp16(flat, p) for p in self.packed], dim=-1)
        return out.view(*x.shape[:-1], -1)


class HalfLinear(nn.Module):
    """The head in float16 through ``F.linear`` (oneDNN's fp16 path); float32 logits."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight.detach().half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.half(), self.weight).float()


def _rms_one_call(module: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.rms_norm(x, (module.weight.shape[0],), module.weight, module.variance_epsilon)


def variants(model: Any) -> dict[str, Callable[[], None]]:
    """name -> a function that puts the model in that variant."""
    table = model.get_input_embeddings().weight  # tied: the head's float table
    plain = nn.Linear(table.shape[1], table.shape[0], bias=False, dtype=table.dtype)
    plain.weight = nn.Parameter(table.detach(), requires_grad=False)
    heads = {
        "head-int8": Int8WeightOnlyLinear(plain),
        "head-fp16": FbgemmFp16Head(table),
        "head-half": HalfLinear(table),
    }
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]

    def set_head(name: str) -> None:
        model.lm_head = heads[name]

    def set_norm(form: Callable[..., torch.Tensor]) -> None:
        for norm in norms:
            width = (norm.weight.shape[0],)
            norm.forward = partial(form, norm) if form is _rms_one_call else partial(form, norm, width)

    def defaults_and(change: Callable[[], None]) -> None:  # every variant is the defaults with one part swapped
        set_head("head-int8")
        set_norm(_one_call)
        change()

    changes: dict[str, Callable[[], None]] = {name: partial(set_head, name) for name in heads}
    changes |= {"norm-rms": partial(set_norm, _rms_one_call), "norm-ln": partial(set_norm, _one_call)}
    changes["fused"] = lambda: None  # the defaults; main() runs the compiled step for it
    return {name: partial(defaults_and, change) for name, change in changes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512, help="prompt tokens before the decode steps")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--variants", default="head-int8,head-fp16,head-half")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-out/decode_ab.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = argparse.Namespace(formats="fast", dtype=None, weights_quant=None, kv_dtype=None)
    apply_preset(preset)
    lm = load("smollm2", preset.dtype, weights_quant=preset.weights_quant)
    model = lm.model
    chosen = args.variants.split(",")
    setters = variants(model)
    steps = args.rounds * len(chosen)
    cache = TierCache(model, build("full"), StoreConfig(kv_dtype=preset.kv_dtype))
    cache.plan(args.length, args.length + steps + 16)
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in chosen}
    with torch.inference_mode(), patched_attention(model):
        token = int(prefill(model, cache, ids, 512).argmax())
        fused, why = fused_decoder(lm, [cache])
        if "fused" in chosen and fused is None:
            raise SystemExit(f"the fused step does not run here: {why}")
        steps_of = {name: partial(forward_token, model, cache) for name in chosen}
        if fused is not None:
            steps_of["fused"] = lambda token: fused.step([cache], [token])[0]
        for name in chosen:  # an untimed step per variant (first calls of its kernels)
            setters[name]()
            token = int(steps_of[name](token).argmax())
        for r in range(args.rounds):
            for name in chosen[r % len(chosen) :] + chosen[: r % len(chosen)]:
                setters[name]()
                start = time.perf_counter()
                token = int(steps_of[name](token).argmax())
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    base = medians[chosen[0]]
    print(f"SmolLM2 default formats, full cache, {args.length} -> {args.length + steps} tokens, ", end="")
    print(f"{args.threads} threads, {args.rounds} interleaved rounds")
    print("| variant | median ms/step | p10-p90 | vs first |")
    print("|---|---|---|---|")
    for name, t in times.items():
        q = statistics.quantiles(t, n=10)
        print(f"| {name} | {medians[name]:.1f} | {q[0] * 1e3:.1f}-{q[-1] * 1e3:.1f} | {medians[name] / base:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ms = {name: [x * 1e3 for x in t] for name, t in times.items()}
    Path(args.out).write_text(json.dumps({"args": vars(args), "ms": ms}))


if __name__ == "__main__":
    main()
