"""InfLLM and EM-LLM: exact below the window, every token attended once, retrieval finds a planted block."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ARCHITECTURES, VOCAB, tiny
from tests.test_equivalence import chunked_logits
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.kvstore.blocks import StoreConfig
from tiermem.layer_info import describe_layers
from tiermem.memory import EMLLM, InfLLM
from tiermem.memory.context_memory import ContextMemoryLayer, ContextMemoryPolicy
from tiermem.memory.infllm import InfLLMLayer
from tiermem.rope import apply_rope

SMALL_INFLLM = InfLLM(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16)
SMALL_EMLLM = EMLLM(n_init=4, n_local=32, n_mem=16, min_block_size=2, max_block_size=8, exc_block_size=16)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("policy", [InfLLM(n_local=64, exc_block_size=16), EMLLM(n_local=64, exc_block_size=16)])
def test_context_inside_the_window_is_exact(arch: str, policy: ContextMemoryPolicy) -> None:
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    for chunk in (45, 7):
        torch.testing.assert_close(chunked_logits(model, policy, ids, chunk), reference, atol=5e-5, rtol=1e-4)


def run(model: torch.nn.Module, policy: ContextMemoryPolicy, n: int, chunk: int, store: StoreConfig | None = None):
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(7))
    cache = TierCache(model, policy, store)
    cache.plan(n, n)
    outs = []
    with torch.no_grad(), patched_attention(model):
        for start in range(0, n, chunk):
            part = ids[:, start : start + chunk]
            positions = torch.arange(start, start + part.shape[1])[None]
            outs.append(model(input_ids=part, cache=cache, position_ids=positions).logits)
    return cache, torch.cat(outs, dim=1)


@pytest.mark.parametrize("policy", [SMALL_INFLLM, SMALL_EMLLM], ids=["infllm", "emllm"])
def test_every_token_has_one_place(llama: torch.nn.Module, policy: ContextMemoryPolicy) -> None:
    cache, logits = run(llama, policy, n=300, chunk=25)
    assert torch.isfinite(logits).all()
    for layer in cache.tier_layers:
        assert isinstance(layer, ContextMemoryLayer)
        assert layer.init_k.shape[2] == 4
        assert all(1 <= size <= 8 for size in layer.block_sizes)
        in_memory = layer.init_k.shape[2] + sum(layer.block_sizes) + layer.rem_k.shape[2]
        assert in_memory == layer.graduated  # every token that left the window is in init, a block or the remainder
        assert layer.graduated == 300 - 32 + 1  # the window keeps the last n_local - 1 tokens
        assert layer.block_starts == sorted(layer.block_starts)
        assert len(layer.last_retrieved) <= 4
        assert layer.local.length <= layer.policy.local_slots()


def test_positions_stay_bounded_past_the_trained_window(llama: torch.nn.Module) -> None:
    """The tiny model has 512 positions; block memory reads 1500 tokens without leaving them."""
    policy = InfLLM(n_init=4, n_local=64, block_size=16, topk=4, exc_block_size=32)
    policy.check(context_tokens=1500, total_tokens=1510, max_positions=512)
    _, logits = run(llama, policy, n=1500, chunk=100)
    assert torch.isfinite(logits).all()


def test_ram_and_disk_stores_give_the_same_answers(llama: torch.nn.Module, tmp_path) -> None:
    _, in_ram = run(llama, SMALL_INFLLM, n=300, chunk=25)
    disk = StoreConfig(backend="disk", folder=str(tmp_path), warm_bytes=4096)  # a few blocks: most reads hit disk
    cache, on_disk = run(llama, SMALL_INFLLM, n=300, chunk=25, store=disk)
    assert cache.store.reads > 0 and cache.store.disk_bytes > 0
    assert torch.equal(in_ram, on_disk)
    assert cache.store.peak_warm_bytes <= 4096
    cache.close()
    assert not list(tmp_path.iterdir())  # the store's folder is removed


def test_retrieval_finds_a_planted_block(llama: torch.nn.Module) -> None:
    info = describe_layers(llama)[0]
    layer = InfLLMLayer(info, InfLLM(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16))
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(info.head_dim, generator=gen)
    direction /= direction.norm()
    keys = torch.randn(1, info.num_kv_heads, 300, info.head_dim, generator=gen) * 0.1
    keys[:, :, 100:108] = 3 * direction  # positions 100..107 form block 12 (blocks start after 4 init tokens)
    with torch.no_grad():
        for start in range(0, 300, 20):
            q = torch.randn(1, info.num_heads, 20, info.head_dim, generator=gen)
            layer.attend(q, keys[:, :, start : start + 20], torch.randn(1, info.num_kv_heads, 20, info.head_dim))
    assert layer.block_starts[12] == 100 and layer.block_sizes[12] == 8
    query = direction.repeat(info.num_heads)  # the same direction for every query head
    assert 12 in layer.retrieve(query, 1)
    assert layer.retrieve(query, 1)[0] == 12


def test_emllm_cuts_events_at_surprise(llama: torch.nn.Module) -> None:
    """With the surprise the engine observes, events end where the model was surprised."""
    policy = EMLLM(n_init=4, n_local=32, n_mem=64, min_block_size=2, max_block_size=32, exc_block_size=16)
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(8))
    surprise = torch.ones(200)
    surprise[[50, 90, 95, 140]] = 20.0  # 95 is only 5 after 90: still an event of 5 >= min_block_size 2
    cache = TierCache(llama, policy)
    cache.plan(200, 200)
    with torch.no_grad(), patched_attention(llama):
        for start in range(0, 200, 20):
            llama(input_ids=ids[:, start : start + 20], cache=cache, position_ids=torch.arange(start, start + 20)[None])
            cache.observe_surprise(surprise[start : start + 20])
    layer = cache.tier_layers[0]
    assert isinstance(layer, ContextMemoryLayer)
    # Events 4..49 (46 tokens), 50..89 (40), 90..94 (5), 95..139 (45): above max_block_size 32 they are split.
    assert layer.block_starts[:6] == [4, 36, 50, 82, 90, 95]
    assert layer.block_sizes[:5] == [32, 14, 32, 8, 5]


def _decode_step_against_full_attention(llama: torch.nn.Module, memory_positions: str) -> tuple[torch.Tensor, ...]:
    """Feed 300 random tokens to one layer, then one more; return its output and full attention's for that token."""
    info = describe_layers(llama)[0]
    policy = InfLLM(n_init=4, n_local=32, block_size=8, topk=64, exc_block_size=16, memory_positions=memory_positions)
    layer = InfLLMLayer(info, policy)
    gen = torch.Generator().manual_seed(5)
    n, hq, hkv, d = 301, info.num_heads, info.num_kv_heads, info.head_dim
    q, k, v = (torch.randn(1, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    with torch.no_grad():
        for start in range(0, 300, 20):
            layer.attend(q[:, :, start : start + 20], k[:, :, start : start + 20], v[:, :, start : start + 20])
        out = layer.attend(q[:, :, 300:], k[:, :, 300:], v[:, :, 300:])
        cos, sin = info.rope.cos_sin_range(0, n)
        keys = apply_rope(k, cos, sin).repeat_interleave(hq // hkv, dim=1)
        query = apply_rope(q[:, :, 300:], cos[300:], sin[300:])
        weights = torch.softmax(query @ keys.transpose(-1, -2) * info.scaling, dim=-1)
        return out, weights @ v.repeat_interleave(hq // hkv, dim=1)


def test_ordered_memory_positions_are_exact_when_everything_is_retrieved(llama: torch.nn.Module) -> None:
    """With every block retrieved, "ordered" puts each memory token at its true distance from a decoding query, so
    the step equals full attention; the papers' "fixed" distance does not."""
    out, reference = _decode_step_against_full_attention(llama, "ordered")
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    out, reference = _decode_step_against_full_attention(llama, "fixed")
    assert not torch.allclose(out, reference, atol=1e-3)


def test_sentence_blocks_end_at_sentence_ends() -> None:
    from tiermem.memory.infllm import sentence_blocks

    assert sentence_blocks([], 0, 40, (4, 12), 8) == [8, 8, 8, 8]  # no sentence end: the paper's fixed blocks
    assert sentence_blocks([], 0, 11, (4, 12), 8) == []  # waits for `most` tokens, so a later end can still count
    # ends at positions 5 and 8 (blocks of 6 or 9 tokens): 9 is nearer to 8; the next block starts at 9
    assert sentence_blocks([5, 8, 30], 0, 24, (4, 12), 8) == [9, 8]
    assert sentence_blocks([2], 0, 12, (4, 12), 8) == [8]  # a block of 3 would be under the fewest (4)


def test_infllm_sentence_boundaries_cut_blocks_at_sentence_ends(llama: torch.nn.Module) -> None:
    policy = InfLLM(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16, boundaries="sentence")
    n, chunk, period = 300, 25, 11
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(7))
    cache = TierCache(llama, policy)
    cache.plan(n, n)
    with torch.no_grad(), patched_attention(llama):
        for start in range(0, n, chunk):
            part = ids[:, start : start + chunk]
            cache.observe_tokens(start, ["." if (start + i) % period == period - 1 else " w" for i in range(25)])
            llama(input_ids=part, cache=cache, position_ids=torch.arange(start, start + part.shape[1])[None])
    for layer in cache.tier_layers:
        assert isinstance(layer, InfLLMLayer)
        assert len(layer.block_sizes) >= 15
        for first, size in zip(layer.block_starts, layer.block_sizes, strict=True):
            assert (first + size) % period == 0  # the block's last token ends a sentence
            assert 4 <= size <= 12
        assert layer.init_k.shape[2] + sum(layer.block_sizes) + layer.rem_k.shape[2] == layer.graduated
