"""Local (sliding-window) layers keep their window under every policy and never grow with the prompt."""

from __future__ import annotations

import torch

from tests.conftest import VOCAB, tiny
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.memory import SlidingWindowLayer, SnapKV
from tiermem.memory.snapkv import SnapKVLayer


def test_gemma3_layers_follow_their_type() -> None:
    model = tiny("gemma3")
    cache = TierCache(model, SnapKV(kv_budget=32, window_size=4))
    kinds = [type(layer) for layer in cache.tier_layers]
    assert kinds == [SlidingWindowLayer, SlidingWindowLayer, SnapKVLayer, SlidingWindowLayer]
    ropes = {id(info.rope) for info in cache.infos}
    assert len(ropes) == 2  # local and global layers rotate with different bases


def test_sliding_layers_stay_bounded() -> None:
    model = tiny("gemma3")
    ids = torch.randint(0, VOCAB, (1, 400), generator=torch.Generator().manual_seed(6))
    cache = TierCache(model, SnapKV(kv_budget=4096))
    cache.plan(400, 400)
    with torch.no_grad(), patched_attention(model):
        for start in range(0, 400, 50):
            model(input_ids=ids[:, start : start + 50], cache=cache, position_ids=torch.arange(start, start + 50)[None])
    for layer in cache.tier_layers:
        if isinstance(layer, SlidingWindowLayer):
            assert layer.kv_tokens() <= 8 - 1 + SlidingWindowLayer.slack + 50
        else:
            assert layer.kv_tokens() == 400
