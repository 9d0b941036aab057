"""``--policy auto``: tiermem's best measured configuration for the prompt, the model and what the user asked.

The choice is made per prompt, once its length is known (:func:`tiermem.engine.generate` resolves it), from rules
that follow the measurements in BENCHMARKS.md ("--policy auto"):

1. A KV budget or a compression ratio was asked for: the compression policy that measured best at that setting:
   with the question in view, ``snapkv-sentence`` (30/30 needles at 8x where full found 29/30), its budget covering
   the question and answer too; question-agnostic, ``adakv-expected-attention`` (kvpress's leaderboard press; 4/5
   at ratio 0.5 where SnapKV found 2/5, a small sample).
2. The prompt runs past the model's trained positions: block memory whose blocks the question picks through the
   model's retrieval heads (``infllm-heads``): full attention degenerates there and the papers' block memory
   misses facts in prose.
3. ``--kv-memory`` cannot hold full attention's KV for the whole run: the same block memory, which keeps a bounded
   hot set and puts the rest in the (disk) block store.
4. Otherwise full attention: the prompt fits the window and the memory, and the unmodified model is exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiermem.errors import TiermemError
from tiermem.layer_info import LayerInfo
from tiermem.memory.base import Policy
from tiermem.memory.layer import TierLayer

if TYPE_CHECKING:
    from tiermem.engine import GenerationConfig

LONG_CONTEXT = "infllm-heads"  # past the window or over the memory limit
COMPRESSION_QUESTION_AWARE = "snapkv-sentence"  # a budget with the question in view
COMPRESSION_AGNOSTIC = "adakv-expected-attention"  # a budget, context compressed before the question


@dataclass(frozen=True)
class Choice:
    """The policy auto picked and why, in one line for the cost summary and ``--json``."""

    policy: Policy
    reason: str


@dataclass
class Auto(Policy):
    """Picks a policy per prompt (see the module docstring); ``kv_budget`` or ``compression_ratio`` ask for a
    compressed cache of that size. Not a policy of its own: :meth:`choose` returns the one that runs."""

    name = "auto"
    paper = "tiermem: the best measured configuration (BENCHMARKS.md)"
    kv_budget: int | None = None
    compression_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.compression_ratio is not None and not 0.0 <= self.compression_ratio < 1.0:
            raise TiermemError(f"compression ratio must be in [0, 1), got {self.compression_ratio}")
        if self.kv_budget is not None and self.kv_budget < 1:
            raise TiermemError(f"KV budget must be at least 1 token, got {self.kv_budget}")
        if self.kv_budget is not None and self.compression_ratio is not None:
            raise TiermemError("policy 'auto' takes a KV budget or a compression ratio, not both")

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        raise TiermemError("policy 'auto' picks a policy per prompt: run it through tiermem's engine")

    def choose(
        self, infos: list[LayerInfo], context_tokens: int, total_tokens: int, config: GenerationConfig
    ) -> Choice:
        """The policy for a run of ``total_tokens`` tokens (``context_tokens`` before the question)."""
        from tiermem.memory import registry

        if self.kv_budget is not None or self.compression_ratio is not None:
            name = COMPRESSION_QUESTION_AWARE if config.question_aware else COMPRESSION_AGNOSTIC
            # The budget counts the tokens read after compression too, so the KV held while decoding is what the
            # user asked for (a ratio of 0.875 holds at most 1/8 of full's), not that plus the question and answer.
            budget: dict[str, object] = {"kv_budget": self.kv_budget, "compression_ratio": self.compression_ratio}
            if "budget_includes_new" in {f.name for f in dataclasses.fields(registry.REGISTRY[name].cls)}:
                budget["budget_includes_new"] = True
            asked = f"{self.kv_budget} tokens" if self.kv_budget is not None else f"ratio {self.compression_ratio}"
            setting = "question-aware" if config.question_aware else "question-agnostic"
            return Choice(registry.build(name, **budget), f"a compressed cache ({asked}, {setting}): {name}")
        positions = infos[0].max_positions if infos else 0
        if positions and total_tokens > positions:
            reason = f"{total_tokens} tokens run past the model's {positions} positions: {LONG_CONTEXT}"
            return Choice(registry.build(LONG_CONTEXT), reason)
        full_bytes = sum(i.kv_bytes_per_token() for i in infos) * total_tokens
        if config.kv_memory is not None and full_bytes > config.kv_memory:
            reason = (
                f"full attention needs {full_bytes / 2**20:.0f} MiB of KV, over --kv-memory "
                f"{config.kv_memory / 2**20:.0f} MiB: {LONG_CONTEXT}"
            )
            return Choice(registry.build(LONG_CONTEXT), reason)
        return Choice(registry.build("full"), f"{total_tokens} tokens fit the model's window and memory: full")
