"""The Policy interface: a dataclass of hyperparameters that builds one :class:`TierLayer` per attention layer."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tiermem.errors import TiermemError
from tiermem.layer_info import LayerInfo
from tiermem.memory.layer import DEFAULT_CHUNK_TOKENS, SlidingWindowLayer, TierLayer

if TYPE_CHECKING:
    from tiermem.kvstore.blocks import BlockStore


@dataclass
class Policy:
    """A KV-cache policy. Its fields are its hyperparameters, so ``repr(policy)`` is a complete recipe.

    Use it with tiermem's engine (:func:`tiermem.engine.generate`), or as a context manager around a plain
    ``model.generate(...)``, as kvpress's presses are used::

        with SnapKV(kv_budget=512)(model):
            model.generate(input_ids, max_new_tokens=32)
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    hot_set: ClassVar[str] = "the whole prompt"  # what it holds in RAM, for the --kv-memory error
    # True when prompts may run past the model's trained positions: the policy bounds the positions it uses
    # (StreamingLLM re-rotation, block memory), or the user asked to extrapolate (Full(extrapolate=True)).
    fits_any_length: ClassVar[bool] = False
    # True when the policy needs each token's surprise -log p(token | prefix) (the engine then computes all logits).
    needs_surprise: ClassVar[bool] = False
    # True when the policy needs each token's decoded text (SentenceKV finds sentence ends in it).
    needs_token_text: ClassVar[bool] = False

    def make_layer(self, info: LayerInfo) -> TierLayer:
        """The layer memory for one attention layer; local (sliding-window) layers keep their window as is."""
        if info.sliding_window is not None:
            return SlidingWindowLayer(info)
        return self.make_global_layer(info)

    @abstractmethod
    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        """The layer memory for one global-attention layer."""

    def setup(self, layers: list[TierLayer], store: BlockStore) -> None:
        """Connect a cache's layers to shared state (the block store; EM-LLM adds its event boundaries)."""
        for layer in layers:
            layer.bind(store)

    def observe_surprise(self, layers: list[TierLayer], surprise: torch.Tensor) -> None:
        """Receive the surprise (T,) of the tokens of the last forward. Default: unused."""

    @property
    def probes_question(self) -> bool:
        """True when the policy wants a probe forward of the question before reading it (``TierCache.probe``)."""
        return False

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Per-model preparation before a cache is built (e.g. calibration, cached on disk). Default: nothing."""

    def after_probe(self, layers: list[TierLayer]) -> None:
        """Decide from what the probe forward recorded (``TierCache.probe``). Default: nothing."""

    def observe_tokens(self, layers: list[TierLayer], start: int, pieces: list[str]) -> None:
        """Receive the decoded text of the tokens at positions ``start, start+1, ...``. Default: unused."""

    def peak_bytes(
        self, info: LayerInfo, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> int:
        """Most bytes one layer holds in RAM during a run (the ``--kv-memory`` check), prefill arriving
        ``chunk_tokens`` at a time. Default: every token."""
        return self.peak_tokens(info, context_tokens, total_tokens, chunk_tokens) * (
            info.kv_bytes_per_token() + 8 * info.num_kv_heads
        )

    def peak_tokens(
        self, info: LayerInfo, context_tokens: int, total_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> int:
        """Most tokens one layer of a dense-buffer policy holds (K, V and an int64 position per head each)."""
        if info.sliding_window is not None:
            return min(total_tokens, info.sliding_window + SlidingWindowLayer.slack + chunk_tokens)
        return total_tokens

    def check(self, context_tokens: int, total_tokens: int, max_positions: int) -> None:
        """Raise :class:`TiermemError` when this policy cannot run this many tokens on a model."""
        if max_positions and total_tokens > max_positions and not self.fits_any_length:
            raise TiermemError(
                f"prompt plus new tokens ({total_tokens}) exceed the model's {max_positions} positions under policy "
                f"'{self.name}', which keeps original positions; shorten the prompt or use a policy that bounds them"
            )

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Iterator[None]:
        """Run ``model`` under this policy inside the ``with`` block (plain ``model(...)`` and ``generate`` alike)."""
        from tiermem.attention import patched_attention

        with patched_attention(model, layer_factory=self.make_layer):
            yield


@dataclass
class BudgetedPolicy(Policy):
    """A policy that keeps a bounded number of KV tokens per layer and head.

    Give exactly one of ``kv_budget`` (tokens kept per layer) or ``compression_ratio`` (fraction of the context
    removed, kvpress's convention: kept = int(context * (1 - ratio))).
    """

    kv_budget: int | None = None
    compression_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.kv_budget is None) == (self.compression_ratio is None):
            raise TiermemError(f"policy '{self.name}' needs exactly one of a KV budget (tokens) or a compression ratio")
        if self.compression_ratio is not None and not 0.0 <= self.compression_ratio < 1.0:
            raise TiermemError(f"compression ratio must be in [0, 1), got {self.compression_ratio}")
        if self.kv_budget is not None:
            self._check_budget(self.kv_budget)

    def fixed_tokens(self) -> int:
        """Tokens the policy always keeps whatever the scores (sinks, observation window)."""
        return 0

    def fixed_parts(self) -> str:
        return "fixed parts"

    def _check_budget(self, budget: int) -> None:
        if budget < 1 or budget < self.fixed_tokens() + 1:
            raise TiermemError(
                f"KV budget of {budget} tokens is too small for policy '{self.name}': its {self.fixed_parts()} "
                f"alone take {self.fixed_tokens()} tokens"
            )

    def budget_for(self, context_tokens: int) -> int:
        """Tokens to keep per layer for a context of ``context_tokens`` tokens."""
        if self.kv_budget is not None:
            return self.kv_budget
        assert self.compression_ratio is not None
        return max(1, int(context_tokens * (1.0 - self.compression_ratio)))

    def check(self, context_tokens: int, total_tokens: int, max_positions: int) -> None:
        super().check(context_tokens, total_tokens, max_positions)
        if context_tokens > self.budget_for(context_tokens):  # nothing is evicted otherwise
            self._check_budget(self.budget_for(context_tokens))
