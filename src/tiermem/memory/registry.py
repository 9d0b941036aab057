"""Policies by name: the one place a policy is registered. The CLI, the benchmark and the tests read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tiermem.errors import TiermemError
from tiermem.memory.adakv import AdaKV, AdaKVExpectedAttention
from tiermem.memory.auto import Auto
from tiermem.memory.base import BudgetedPolicy, Policy
from tiermem.memory.emllm import EMLLM
from tiermem.memory.expected_attention import ExpectedAttention
from tiermem.memory.full import Full
from tiermem.memory.infllm import InfLLM
from tiermem.memory.knorm import Knorm
from tiermem.memory.observed_attention import ObservedAttention
from tiermem.memory.pyramidkv import PyramidKV
from tiermem.memory.sentencekv import SentenceKV
from tiermem.memory.snapkv import SnapKV
from tiermem.memory.streaming import StreamingLLM
from tiermem.memory.tova import TOVA


@dataclass(frozen=True)
class Entry:
    """A registered policy: its class plus the defaults that make it a named variant."""

    cls: type[Policy]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


# A model of ~100M parameters reads a passkey in 512 tokens but not in 1024 (SmolLM2-135M, BENCHMARKS.md), so the
# papers' 4096-token window drowns the retrieved fact; these variants keep the attended set near 600 tokens and give
# memory ordered positions (ContextMemoryPolicy.memory_positions) so a number's digit tokens keep their order.
SMALL_MODEL_MEMORY: dict[str, Any] = {
    "n_init": 64,
    "n_local": 256,
    "exc_block_size": 256,
    "memory_positions": "ordered",
}

# Block memory picked by the question through the model's retrieval heads (tiermem.memory.head_retrieval): the
# papers' per-layer mean-query retrieval found a needle in news prose 0/5 at 4k where this finds 5/5 (BENCHMARKS.md);
# the block after each retrieved one comes too, so a fact cut by a block boundary is read whole.
HEADS_RETRIEVAL: dict[str, Any] = {"retrieval": "heads", "neighbours": 1}

REGISTRY: dict[str, Entry] = {
    "auto": Entry(Auto, summary="tiermem's best measured policy for the prompt, model and budget (the default)"),
    "full": Entry(Full, summary="no compression (baseline)"),
    "streaming": Entry(StreamingLLM, summary="StreamingLLM: 4 attention sinks + recent tokens"),
    "snapkv": Entry(SnapKV, summary="SnapKV: prompt tokens the observation window attends to (paper defaults)"),
    "snapkv-chunk": Entry(
        SnapKV,
        {"selection": "chunk", "chunk_size": 32, "kernel_size": 7, "pooling": "maxpool"},
        "SnapKV scores, whole 32-token chunks kept (tiermem variant, ChunkKV-style)",
    ),
    "snapkv-sentence": Entry(
        SnapKV,
        {
            "selection": "sentence",
            "chunk_size": 64,
            "vote": "max",
            "shared_heads": True,
            "kernel_size": 7,
            "pooling": "maxpool",
        },
        "SnapKV with max-over-window votes, whole sentences kept, one choice per layer (tiermem variant)",
    ),
    "knorm": Entry(Knorm, summary="Knorm: keys with the smallest L2 norm (kvpress KnormPress)"),
    "tova": Entry(TOVA, summary="TOVA: tokens the last context token attends to, all heads averaged (kvpress)"),
    "observed-attention": Entry(
        ObservedAttention, summary="H2O-style: attention each key received over the whole prefill (kvpress)"
    ),
    "expected-attention": Entry(
        ExpectedAttention, summary="Expected Attention: attention of Gaussian-modelled future queries x ||v|| (kvpress)"
    ),
    "pyramidkv": Entry(PyramidKV, summary="PyramidKV: SnapKV scores, budgets falling linearly with depth (kvpress)"),
    "adakv": Entry(AdaKV, summary="AdaKV over SnapKV: one layer budget split across KV heads by score, ragged storage"),
    "adakv-expected-attention": Entry(
        AdaKVExpectedAttention,
        {"epsilon": 1e-2},
        "AdaKV over Expected Attention, epsilon 1e-2 (kvpress's leaderboard expected_attention), ragged storage",
    ),
    "infllm": Entry(InfLLM, summary="InfLLM: init + local window + retrieved 128-token blocks at a fixed distance"),
    "emllm": Entry(EMLLM, summary="EM-LLM: InfLLM-style memory cut into events where the model is surprised"),
    "infllm-small": Entry(
        InfLLM,
        {**SMALL_MODEL_MEMORY, "block_size": 64, "topk": 4},
        "InfLLM for small models: 256-token window, 4 retrieved 64-token blocks in order (tiermem variant)",
    ),
    "emllm-small": Entry(
        EMLLM,
        {**SMALL_MODEL_MEMORY, "max_block_size": 64, "n_mem": 256},
        "EM-LLM for small models: 256-token window, 256 retrieved event tokens in order (tiermem variant)",
    ),
    "infllm-heads": Entry(
        InfLLM,
        {**SMALL_MODEL_MEMORY, **HEADS_RETRIEVAL, "block_size": 64, "topk": 4},
        "infllm-small whose blocks are picked once from the question by calibrated retrieval heads (tiermem variant)",
    ),
    "infllm-heads-sentence": Entry(
        InfLLM,
        {**SMALL_MODEL_MEMORY, **HEADS_RETRIEVAL, "block_size": 64, "topk": 4, "boundaries": "sentence"},
        "infllm-heads whose blocks end at sentence ends, so a fact is not cut between blocks (tiermem variant)",
    ),
    "emllm-heads": Entry(
        EMLLM,
        {**SMALL_MODEL_MEMORY, **HEADS_RETRIEVAL, "max_block_size": 64, "n_mem": 256},
        "emllm-small whose events are picked once from the question by calibrated retrieval heads (tiermem variant)",
    ),
    "sentencekv": Entry(SentenceKV, summary="SentenceKV: sentence vectors hot, sentences' KV offloaded, retrieved"),
}


def names() -> list[str]:
    return list(REGISTRY)


def takes_budget(name: str) -> bool:
    """Whether the policy needs a KV budget or compression ratio (``auto`` takes one optionally)."""
    return issubclass(_entry(name).cls, BudgetedPolicy)


def budget_optional(name: str) -> bool:
    """Whether the policy takes a budget or a ratio without needing one (``auto``)."""
    return _entry(name).cls is Auto


def _entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise TiermemError(f"unknown policy '{name}': use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _convert(field_type: str, default: Any, raw: str) -> Any:
    """Turn a CLI string into the field's type (annotations are strings under ``from __future__``)."""
    text = raw.strip()
    if "bool" in field_type:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(raw)
    if "int" in field_type:
        return int(text)
    if "float" in field_type:
        return float(text)
    return text


def build(name: str, **options: Any) -> Policy:
    """Make a policy by registry name; ``options`` override its fields (strings are converted to the field types)."""
    entry = _entry(name)
    fields = {f.name: f for f in dataclasses.fields(entry.cls)}
    kwargs = dict(entry.defaults)
    for key, value in options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise TiermemError(f"policy '{name}' has no option '{key}' (options: {known})")
        if isinstance(value, str):
            try:
                value = _convert(str(fields[key].type), fields[key].default, value)
            except ValueError:
                raise TiermemError(f"bad value '{value}' for {name} option {key} ({fields[key].type})") from None
        kwargs[key] = value
    return entry.cls(**kwargs)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"snapkv:window_size=64,kernel_size=7"`` -> ``("snapkv", {"window_size": "64", "kernel_size": "7"})``."""
    name, _, rest = spec.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise TiermemError(f"bad policy option '{item}' in '{spec}': expected key=value")
        options[key.strip()] = value
    _entry(name.strip())
    return name.strip(), options
