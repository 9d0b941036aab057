"""A one-layer calibration of the model's own shapes under a KV policy: what a decoder layer costs here.

The machine's GEMV rate alone predicted 0.45-0.89x of the measured decode time (BENCHMARKS.md): small matrices do
not reach the streaming rate, and each layer pays for norms, RoPE, attention bookkeeping and the policy's
retrieval. So the planner builds the model's architecture with one and with two decoder layers (random weights, a
small vocabulary: the layers' shapes are the model's), runs each under the policy through tiermem's engine for
``context`` tokens in 512-token chunks, then decodes a few tokens; the difference is one layer's cost. The
roofline then scales it to other contexts (attention bytes and FLOPs) and placements (layer loads).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LayerProfile:
    """Seconds one decoder layer takes per decoded token after ``context`` tokens and per prefill chunk, and the
    fixed cost of one forward outside the layers (embedding, final norm, cache bookkeeping; head excluded)."""

    decode_s: float
    chunk_s: float  # a full chunk, averaged over the chunks after the first
    forward_s: float
    context: int
    chunk: int
    hot_tokens: int  # KV tokens the decode step attended to


def few_layer_config(config: Any, layers: int) -> Any:
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    small.vocab_size = 512
    if getattr(small, "layer_types", None):
        small.layer_types = [config.layer_types[-1]] * layers  # global layers (Gemma3's last layer is global)
    return small


def time_model(config: Any, layers: int, policy_spec: str, context: int, chunk: int) -> tuple[float, float]:
    """(median seconds per decoded token, mean seconds per prefill chunk after the first) of a ``layers``-layer
    model of ``config``'s shapes under ``policy_spec``."""
    from transformers import AutoModelForCausalLM

    from tiermem.attention import patched_attention
    from tiermem.cache import TierCache
    from tiermem.engine import forward
    from tiermem.memory import registry

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(few_layer_config(config, layers), dtype=torch.float32).eval()
    name, options = registry.parse_spec(policy_spec)
    cache = TierCache(model, registry.build(name, **options))
    ids = torch.randint(0, 512, (1, context + 8), generator=torch.Generator().manual_seed(0))
    chunk_times, steps = [], []
    with torch.inference_mode(), patched_attention(model):
        cache.plan(context, context + 8)
        for start in range(0, context, chunk):
            t = time.perf_counter()
            forward(model, cache, ids[:, start : min(start + chunk, context)])
            chunk_times.append(time.perf_counter() - t)
        cache.end_context()
        for i in range(context, context + 8):
            t = time.perf_counter()
            forward(model, cache, ids[:, i : i + 1])
            steps.append(time.perf_counter() - t)
    cache.close()
    later = chunk_times[1:] or chunk_times
    return sorted(steps)[len(steps) // 2], sum(later) / len(later)


def profile_layer(config: Any, policy_spec: str, context: int, hot_tokens: int, chunk: int = 512) -> LayerProfile:
    """Time models of one and two decoder layers of ``config``'s shapes under ``policy_spec``: the difference is
    one layer, the rest the per-forward cost (see the module docstring)."""
    one = time_model(config, 1, policy_spec, context, chunk)
    two = time_model(config, 2, policy_spec, context, chunk)
    return LayerProfile(
        decode_s=max(two[0] - one[0], 1e-6),
        chunk_s=max(two[1] - one[1], 1e-6),
        forward_s=max(2 * one[0] - two[0], 0.0),
        context=context,
        chunk=chunk,
        hot_tokens=min(context, hot_tokens),
    )
