"""SentenceKV: sentence-level semantic vectors kept hot, the sentences' KV warm or cold, retrieved per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import BlockStore, StoreConfig
from tiermem.layer_info import LayerInfo
from tiermem.memory.base import Policy
from tiermem.memory.layer import DenseLayer, TierLayer, attention
from tiermem.memory.sentences import record_sentence_ends, sentence_spans, share_sentence_ends
from tiermem.memory.snapkv import snapkv_scores


@dataclass
class SentenceKV(Policy):
    """SentenceKV (Zhu et al., COLM 2025, arXiv 2504.00970; zzbright1998/SentenceKV).

    Prefill is full attention. Once the context is in, SnapKV scores keep ``semantic_factor * token_budget`` of its
    tokens (observation window ``window_size``, ``kernel_size``, max pooling); the context is cut into sentences,
    and each sentence gets one semantic vector per KV head: the mean of its kept keys. The vectors stay hot; the
    sentences' K and V go to the block store (RAM, or disk under ``--kv-memory``), so only ``start_budget`` first and
    ``recent_budget`` last tokens and the generated tokens stay in the hot cache. At each decoding step, while the
    sentence being generated has more than ``length_threshold`` tokens, the mean of its queries picks sentences by
    similarity until ``token_budget - start_budget - recent_budget`` tokens; otherwise the step attends every kept
    token. Keys stay rotated at their original positions.

    Defaults: the reference LongBench script (``token_budget=1024, semantic_factor=3, window_size=32,
    kernel_size=7``, max pooling, ``start_budget=32, recent_budget=32, length_threshold=1``).

    Departures from the reference code: the reference never offloads (it keeps everything on the GPU and masks), this
    one moves sentences to the block store; sentence ends come from decoded token text (see
    :mod:`tiermem.memory.sentences`); SnapKV scores and sentence choice are shared by the KV heads of a layer (the
    reference picks per expanded query head, a selection GQA storage cannot keep); the SnapKV window is kept hot as
    part of the recent tokens; completed generated sentences stay in the hot cache instead of joining the index.
    """

    name = "sentencekv"
    paper = "SentenceKV, arXiv 2504.00970"
    hot_set = "the whole context during prefill (full attention)"
    needs_token_text = True
    token_budget: int = 1024
    semantic_factor: float = 3.0
    window_size: int = 32
    kernel_size: int = 7
    start_budget: int = 32
    recent_budget: int = 32
    length_threshold: int = 1

    def __post_init__(self) -> None:
        if self.token_budget <= self.start_budget + self.recent_budget:
            raise TiermemError("sentencekv token_budget must exceed start_budget + recent_budget")
        if self.semantic_factor < 1 or self.window_size < 1 or self.kernel_size % 2 == 0:
            raise TiermemError("sentencekv needs semantic_factor >= 1, window_size >= 1 and an odd kernel_size")

    def make_global_layer(self, info: LayerInfo) -> TierLayer:
        return SentenceKVLayer(info, self)

    def setup(self, layers: list[TierLayer], store: BlockStore) -> None:
        super().setup(layers, store)
        share_sentence_ends(layers, SentenceKVLayer)

    def observe_tokens(self, layers: list[TierLayer], start: int, pieces: list[str]) -> None:
        """Record which of the tokens at positions ``start, start+1, ...`` end a sentence."""
        record_sentence_ends(layers, SentenceKVLayer, start, pieces)


class SentenceKVLayer(DenseLayer):
    def __init__(self, info: LayerInfo, policy: SentenceKV):
        super().__init__(info)
        self.policy = policy
        self.sentence_end_positions: list[int] = []
        self.window_queries: torch.Tensor | None = None
        self.compressed = False
        self.store: BlockStore | None = None
        self.semantic = torch.empty(info.num_kv_heads, 0, info.head_dim, dtype=info.dtype)  # (Hkv, S, D)
        self.sentence_sizes: list[int] = []
        self.generated_queries: list[tuple[int, torch.Tensor]] = []  # (position, rotated query) of new tokens
        self.last_selected: list[int] = []

    def bind(self, store: BlockStore) -> None:
        super().bind(store)
        self.store = store

    def after_attend(self, rotated_q: torch.Tensor) -> None:
        if not self.compressed:  # keep the observation window's queries for the SnapKV scores
            recent = rotated_q if self.window_queries is None else torch.cat([self.window_queries, rotated_q], dim=2)
            self.window_queries = recent[:, :, -self.policy.window_size :].clone(memory_format=torch.contiguous_format)

    # -- compression: sentences to the store --------------------------------------------------------------------
    def end_context(self) -> None:
        if self.compressed:
            return
        self.compressed = True
        keys, values, _ = self.buffer.view()  # slot i holds position i: nothing was evicted before this
        n, policy = keys.shape[2], self.policy
        keep_front, keep_back = min(policy.start_budget, n), min(max(policy.recent_budget, policy.window_size), n)
        if n <= keep_front + keep_back:  # the first and last tokens are the whole context: nothing to offload
            return
        kept = self._semantic_selection(keys, n)
        kept = kept[(kept >= keep_front) & (kept < n - keep_back)]
        if self.store is None:
            self.store = BlockStore(StoreConfig(), self.info.dtype)
        vectors = []
        for first, stop in sentence_spans(self.sentence_end_positions, keep_front, n - keep_back):
            members = kept[(kept >= first) & (kept < stop)]
            if members.numel() == 0:
                continue
            block_k, block_v = keys[0][:, members], values[0][:, members]
            self.store.put(self.info.layer_idx, block_k.clone(), block_v.clone())
            vectors.append(block_k.mean(dim=1))
            self.sentence_sizes.append(members.numel())
        self.semantic = torch.stack(vectors, dim=1) if vectors else self.semantic
        hot = torch.cat([torch.arange(keep_front), torch.arange(n - keep_back, n)])
        self.buffer.keep(hot, capacity=hot.numel() + self.headroom())
        self.window_queries = None

    def offload_turn(self) -> None:
        """After a later turn of a chat session (:func:`tiermem.serve.policies.close_turn`): the tokens that arrived
        since the last offload (the previous answer, the new message), except the last ``recent_budget`` (or window),
        become sentences in the store with their semantic vectors, as the context's did at ``end_context``.

        Without it the hot cache would keep every later turn and grow with the conversation. Departure: SnapKV's
        semantic selection is not applied to later turns (every token of them is kept in its sentence), since the
        budget it enforces was spent on the first prompt. Sentence ends are positions; after a compression slot i no
        longer holds position i, so the spans are cut at the slots holding those positions."""
        if not self.compressed:
            return
        keys, values, positions = self.buffer.view()
        n, policy = keys.shape[2], self.policy
        front = min(policy.start_budget, n)
        back = min(max(policy.recent_budget, policy.window_size), n)
        if n <= front + back:
            return
        assert self.store is not None
        slot_pos = positions[0]
        ends = torch.isin(slot_pos, torch.tensor(self.sentence_end_positions, dtype=slot_pos.dtype))
        vectors = []
        for first, stop in sentence_spans(ends.nonzero()[:, 0].tolist(), front, n - back):
            block_k, block_v = keys[0][:, first:stop], values[0][:, first:stop]
            self.store.put(self.info.layer_idx, block_k.clone(), block_v.clone())
            vectors.append(block_k.mean(dim=1))
            self.sentence_sizes.append(stop - first)
        self.semantic = torch.cat([self.semantic, torch.stack(vectors, dim=1)], dim=1)
        hot = torch.cat([torch.arange(front), torch.arange(n - back, n)])
        self.buffer.keep(hot, capacity=hot.numel() + self.headroom())

    def _semantic_selection(self, keys: torch.Tensor, n: int) -> torch.Tensor:
        """Positions (ascending) of the tokens SnapKV keeps for a budget of ``semantic_factor * token_budget``."""
        policy = self.policy
        budget = int(policy.semantic_factor * policy.token_budget)
        w = policy.window_size
        if n <= budget or self.window_queries is None or self.window_queries.shape[2] < w:
            return torch.arange(n)
        scores = snapkv_scores(self.window_queries, keys, self.info.scaling, policy.kernel_size, "maxpool")
        prefix = scores[0].mean(dim=0).topk(budget - w).indices.sort().values
        return torch.cat([prefix, torch.arange(n - w, n)])

    # -- decoding: retrieve sentences ---------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.compressed or not self.sentence_sizes:
            return super().attend(q, k, v)
        q, q_pos = self.append_rotated(q, k, v)
        sentences = self._select(q, self.seen - 1) if q.shape[2] == 1 else list(range(len(self.sentence_sizes)))
        self.last_selected = sentences
        hot_k, hot_v, hot_pos = self.buffer.view()
        assert self.store is not None
        loaded = [self.store.get(self.info.layer_idx, s) for s in sentences]
        keys = torch.cat([hot_k, *(kv[0][None] for kv in loaded)], dim=2)
        values = torch.cat([hot_v, *(kv[1][None] for kv in loaded)], dim=2)
        # Retrieved sentences all precede the new tokens: give them position -1 for the causal rule.
        k_pos = torch.cat([hot_pos[0], torch.full((keys.shape[2] - hot_k.shape[2],), -1, dtype=torch.long)])
        return attention(q, keys, values, q_pos, k_pos, self.info)

    def _select(self, q: torch.Tensor, position: int) -> list[int]:
        """Sentences for one decoding step: all while the new sentence is short, else the most similar ones."""
        policy = self.policy
        last_end = next((e for e in reversed(self.sentence_end_positions) if e < position), -1)
        self.generated_queries = [(p, x) for p, x in self.generated_queries if p > last_end]
        self.generated_queries.append((position, q[0, :, 0]))
        if len(self.generated_queries) <= policy.length_threshold:
            return list(range(len(self.sentence_sizes)))
        mean_q = torch.stack([x for _, x in self.generated_queries]).mean(dim=0)  # (Hq, D)
        grouped = mean_q.view(self.info.num_kv_heads, self.info.group_size, -1)
        scores = torch.einsum("hgd,hsd->s", grouped, self.semantic)  # summed over heads: one choice per layer
        budget = policy.token_budget - policy.start_budget - policy.recent_budget
        chosen, used = [], 0
        for s in scores.argsort(descending=True).tolist():
            if used + self.sentence_sizes[s] > budget:
                continue
            chosen.append(s)
            used += self.sentence_sizes[s]
        return sorted(chosen)

    def kv_bytes(self) -> int:
        return super().kv_bytes() + self.semantic.numel() * self.semantic.element_size()
