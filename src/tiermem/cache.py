"""TierCache: a transformers ``Cache`` whose layers are a policy's :class:`TierLayer` objects."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import BlockStore, StoreConfig
from tiermem.kvstore.meter import MemoryMeter
from tiermem.layer_info import LayerInfo, describe_layers
from tiermem.memory.base import Policy
from tiermem.memory.layer import DEFAULT_CHUNK_TOKENS, TierLayer


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def hot_bytes(policy: Policy, infos: list[LayerInfo], context_tokens: int, total_tokens: int, chunk_tokens: int) -> int:
    """Most KV bytes the policy holds in RAM outside the block store for this run, over all layers, prefill
    arriving ``chunk_tokens`` at a time."""
    return sum(policy.peak_bytes(i, context_tokens, total_tokens, chunk_tokens) for i in infos)


def store_for(
    policy: Policy,
    infos: list[LayerInfo],
    context_tokens: int,
    total_tokens: int,
    kv_memory: int | None,
    store: StoreConfig,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> StoreConfig:
    """``store`` with its backend resolved for this run. Under a ``kv_memory`` limit the hot set must fit, checked
    before any compute; the warm tier then gets what the hot set leaves free (enforced as the run goes, by the
    cache's meter).

    ``backend="auto"`` keeps blocks in RAM without a limit and on disk with one.
    """
    store = store.resolve(kv_memory)
    if kv_memory is not None and store.backend == "ram":
        raise TiermemError("a KV memory limit needs the disk store for what does not fit (--kv-store disk)")
    if kv_memory is not None:
        needed = hot_bytes(policy, infos, context_tokens, total_tokens, chunk_tokens)
        if needed > kv_memory:
            raise TiermemError(
                f"KV memory limit {format_bytes(kv_memory)} is below what policy '{policy.name}' holds in RAM for "
                f"this prompt: {format_bytes(needed)} ({policy.hot_set})"
            )
    return store


class TierCache(Cache):
    """One :class:`TierLayer` per attention layer, built by ``policy``. Pass it to the model as ``cache=``.

    Blocks that block-memory policies evict go to a :class:`BlockStore` (``store``; RAM by default). Call
    :meth:`close` when done: it removes the store's files.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        policy: Policy,
        store: StoreConfig | None = None,
        kv_memory: int | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        self.policy = policy
        self.tokenizer = tokenizer
        self.infos = describe_layers(model, (store or StoreConfig()).kv_dtype)
        self.tier_layers: list[TierLayer] = [policy.make_layer(info) for info in self.infos]
        self.meter = MemoryMeter(kv_memory)
        self.store = BlockStore(store or StoreConfig(), model.dtype, self.meter)
        policy.prepare(model, tokenizer)
        policy.setup(self.tier_layers, self.store)
        super().__init__(layers=list(self.tier_layers))

    def probe(self, model: PreTrainedModel, ids: torch.Tensor, start: int) -> None:
        """Run ``ids`` (1, T) at positions ``start, ...`` through the model storing nothing, then let the policy
        decide from what its layers saw ("heads" retrieval picks its blocks from the question this way).

        Call it inside :func:`tiermem.attention.patched_attention`."""
        for layer in self.tier_layers:
            layer.probe_start = start
        try:
            positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
            model(input_ids=ids, position_ids=positions, cache=self, use_cache=True, logits_to_keep=1)
        finally:
            for layer in self.tier_layers:
                layer.probe_start = None
        self.policy.after_probe(self.tier_layers)

    def plan(self, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        """Tell every layer how long the context and the whole run will be, and the prefill chunk (budgets,
        allocation)."""
        for layer in self.tier_layers:
            layer.plan(context_tokens, total_tokens, chunk_tokens)

    def end_context(self) -> None:
        for layer in self.tier_layers:
            layer.end_context()
            layer.report()

    def observe_surprise(self, surprise: torch.Tensor) -> None:
        """The surprise (T,) of the tokens of the last forward, for policies that segment by it (EM-LLM)."""
        self.policy.observe_surprise(self.tier_layers, surprise)

    def observe_tokens(self, start: int, pieces: list[str]) -> None:
        """The decoded text of the tokens at positions ``start, ...``, for policies that read it (SentenceKV)."""
        self.policy.observe_tokens(self.tier_layers, start, pieces)

    def kv_tokens(self) -> int:
        """Tokens held in RAM by the largest layer, outside the block store."""
        return max(layer.kv_tokens() for layer in self.tier_layers)

    def kv_bytes(self) -> int:
        """KV bytes in RAM now: every layer's hot set plus the block store's RAM tier."""
        return sum(layer.kv_bytes() for layer in self.tier_layers) + self.store.ram_bytes

    def kv_bytes_peak(self) -> int:
        """Peak of the total KV bytes in RAM, as reported after every forward and compression."""
        return max(self.meter.peak, self.kv_bytes())

    def close(self) -> None:
        self.store.close()
