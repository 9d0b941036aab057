"""The policy each session runs under, and what a turn does to a compressing policy's memory.

``--policy auto`` picks a policy per prompt (:class:`tiermem.memory.auto.Auto`); a session picks once, at its first
turn, and keeps that policy for its life: its cache was built by it, so a later turn cannot switch. The server
compresses the whole first prompt as context (the question is in it), which is the engine's ``question_aware``
setting, and the server's ``--kv-memory`` is what auto weighs full attention's KV against. A conversation that
outgrows its session's policy (full attention past the model's positions) starts a new session, where auto
chooses again for the longer history.

A session file names its policy by class and dataclass fields (:meth:`SessionPolicies.spec`); a restart rebuilds it
from them and checks that its ``repr`` (name and every parameter) is the one the file was keyed by.

Per-turn compression: SnapKV and the kvpress-style scorers compress a prompt once, when its context ends, and then
append every later token uncompressed; in a session that would make the memory, and each turn's cost, grow with the
history. :func:`reopen` and :func:`close_turn` apply the policy to every turn instead: the tokens the layer holds
plus the turn's new ones are the context of that turn's compression, under the same budget, so the memory stays
at the budget (plus one turn) however long the conversation runs. With a compression ratio, each turn removes that
fraction of what the layer holds, so the memory converges (to about ``(1 - ratio) / ratio`` turns of new tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tiermem.cache import TierCache
from tiermem.engine import GenerationConfig
from tiermem.layer_info import LayerInfo
from tiermem.memory.auto import Auto
from tiermem.memory.base import Policy
from tiermem.memory.scorer import ScorerLayer
from tiermem.memory.sentencekv import SentenceKVLayer
from tiermem.memory.snapkv import SnapKVLayer
from tiermem.serve.state import StateError, _class, _class_name, _decode, _Encoder

PER_TURN_LAYERS = (SnapKVLayer, ScorerLayer)  # compress once at end_context, then append: reopened every turn


class SessionPolicies:
    """The server's policy and the policies its sessions run under (one object per ``repr``, so a policy's
    ``prepare`` state, such as calibrated retrieval heads, is shared by every session of that policy)."""

    def __init__(self, policy: Policy, infos: list[LayerInfo], kv_memory: int | None = None):
        self.policy = policy
        self.infos = infos
        self.kv_memory = kv_memory
        self.auto = isinstance(policy, Auto)
        self._known: dict[str, Policy] = {} if self.auto else {repr(policy): policy}

    def choose(self, prompt_tokens: int, total_tokens: int) -> tuple[Policy, str]:
        """The policy for a new session whose first prompt has ``prompt_tokens`` (``total_tokens`` with the answer),
        and why (empty unless auto chose)."""
        if not isinstance(self.policy, Auto):
            return self.policy, ""
        new = max(1, total_tokens - prompt_tokens)
        config = GenerationConfig(max_new_tokens=new, question_aware=True, kv_memory=self.kv_memory)
        choice = self.policy.choose(self.infos, prompt_tokens, total_tokens, config)
        return self.intern(choice.policy), choice.reason

    def intern(self, policy: Policy) -> Policy:
        return self._known.setdefault(repr(policy), policy)

    @staticmethod
    def spec(policy: Policy) -> dict[str, Any]:
        """What a session file records of its policy: class, fields, ``repr``."""
        encoder = _Encoder()
        fields = {f.name: encoder.value(getattr(policy, f.name), f.name) for f in dataclasses.fields(policy) if f.init}
        if encoder.tensors:
            raise StateError(f"policy '{policy.name}' has tensor fields and cannot be named in a session file")
        return {"class": _class_name(policy), "fields": fields, "repr": repr(policy)}

    def rebuild(self, spec: Any) -> Policy:
        """The policy a session file names; a :class:`StateError` when it is not one this server may run."""
        if not isinstance(spec, dict) or not isinstance(spec.get("fields"), dict):
            raise StateError("the session file does not name its policy")
        if spec.get("repr") in self._known:
            return self._known[spec["repr"]]
        if not self.auto:  # a fixed policy runs only itself
            raise StateError("the session file was written under another policy")
        cls = _class(str(spec.get("class")), "policy")
        if not (isinstance(cls, type) and issubclass(cls, Policy)) or issubclass(cls, Auto):
            raise StateError("the session file names a class that is not a policy")
        try:
            policy = cls(**{k: _decode(v, {}, None, f"policy.{k}") for k, v in spec["fields"].items()})
        except (TypeError, ValueError) as exc:
            raise StateError(f"the session file's policy cannot be built: {exc}") from None
        if repr(policy) != spec.get("repr"):
            raise StateError("the session file's policy does not rebuild to the one it was written under")
        return self.intern(policy)


def reopen(cache: TierCache, new_tokens: int, max_new_tokens: int, chunk_tokens: int) -> None:
    """Before a later turn's ``new_tokens`` are prefilled (``chunk_tokens`` at a time): let each compress-once layer
    compress again at the end of them, planned as if what it holds plus the new tokens were a fresh context."""
    for layer in cache.tier_layers:
        if isinstance(layer, PER_TURN_LAYERS) and layer.compressed:
            held = layer.buffer.length + new_tokens
            layer.plan(held, held + max_new_tokens, chunk_tokens)
            layer.compressed = False
            layer.window_queries = None
            if isinstance(layer, ScorerLayer):
                layer.received = layer.query_sum = layer.query_outer = None
                layer.query_count = 0


def close_turn(cache: TierCache) -> None:
    """After a later turn's prefill: compress what :func:`reopen` reopened, and move SentenceKV's new tokens into
    sentences in its store (nothing else changes)."""
    for layer in cache.tier_layers:
        if isinstance(layer, SentenceKVLayer):
            layer.offload_turn()
            layer.report()
            continue
        if isinstance(layer, PER_TURN_LAYERS) and not layer.compressed:
            ends = getattr(layer, "sentence_end_positions", None)
            if ends is not None:  # SnapKV's sentence units index slots; after a compression slot i is not position i
                positions = layer.buffer.positions[0, : layer.buffer.length]
                slots = torch.isin(positions, torch.tensor(ends, dtype=positions.dtype)).nonzero()[:, 0]
                layer.sentence_end_positions = slots.tolist()
            try:
                layer.end_context()
            finally:
                if ends is not None:
                    layer.sentence_end_positions = ends  # the list the layers share, as policy.setup made it
            layer.report()
