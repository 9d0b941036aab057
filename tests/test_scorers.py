"""Scorer policies keep what a plain reference computation (kvpress's formulas, one full pass) keeps.

A scorer layer of the tiny Llama (4 query heads, 2 KV heads) is fed random pre-RoPE queries, keys and values in
chunks; the references see the whole sequence at once.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tiermem.layer_info import LayerInfo, describe_layers
from tiermem.memory import TOVA, AdaKV, ExpectedAttention, Knorm, ObservedAttention, PyramidKV, ScorerPolicy
from tiermem.memory.adakv import AdaKVLayer
from tiermem.memory.pyramidkv import pyramid_budgets
from tiermem.memory.scorer import ScorerLayer
from tiermem.rope import apply_rope, rotate_half

N, BUDGET, CHUNK = 100, 40, 13


@pytest.fixture(scope="module")
def info(llama: torch.nn.Module) -> LayerInfo:
    return describe_layers(llama)[0]


def random_qkv(info: LayerInfo, n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, info.num_heads, n, info.head_dim, generator=g)
    k = torch.randn(1, info.num_kv_heads, n, info.head_dim, generator=g) * (1 + torch.rand(n, 1, generator=g))
    v = torch.randn(1, info.num_kv_heads, n, info.head_dim, generator=g) * (1 + torch.rand(n, 1, generator=g))
    return q, k, v


def fed(layer: ScorerLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ScorerLayer:
    layer.plan(q.shape[2], q.shape[2] + 4)
    for start in range(0, q.shape[2], CHUNK):
        part = slice(start, start + CHUNK)
        layer.attend(q[:, :, part], k[:, :, part], v[:, :, part])
    return layer


def rotated(info: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    cos, sin = info.rope.cos_sin_range(0, x.shape[2])
    return apply_rope(x, cos, sin)


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """kvpress's ScorerPress selection (topk), in position order: (Hkv, keep)."""
    return scores[0].topk(keep, dim=-1).indices.sort(dim=-1).values


def kept(policy: ScorerPolicy, info: LayerInfo, seed: int = 0) -> torch.Tensor:
    q, k, v = random_qkv(info, seed=seed)
    layer = fed(ScorerLayer(info, policy), q, k, v)
    layer.end_context()
    return layer.buffer.view()[2]


def snapkv_reference(info: LayerInfo, q: torch.Tensor, k: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """kvpress SnapKVPress.score: window attention (repeat_kv, 1/sqrt(d), triu mask), mean, avg-pool, group mean,
    window padded with max + 1. Returns (1, Hkv, N)."""
    qr, kr = rotated(info, q)[:, :, -window:], rotated(info, k)
    group = info.group_size
    logits = qr @ kr.repeat_interleave(group, dim=1).transpose(2, 3) / math.sqrt(info.head_dim)
    logits += torch.full_like(logits, float("-inf")).triu(diagonal=N - window + 1)
    weights = logits.softmax(dim=-1)[..., :-window]
    scores = F.avg_pool1d(weights.mean(dim=-2), kernel_size=kernel, padding=kernel // 2, stride=1)
    scores = scores.view(1, info.num_kv_heads, group, N - window).mean(2)
    return F.pad(scores, (0, window), value=scores.max().item() + 1)


def test_knorm(info: LayerInfo) -> None:
    _, k, _ = random_qkv(info)
    assert torch.equal(kept(Knorm(kv_budget=BUDGET), info), top(-rotated(info, k).norm(dim=-1), BUDGET))


def test_tova(info: LayerInfo) -> None:
    q, k, _ = random_qkv(info)
    qr, kr = rotated(info, q)[:, :, -1:], rotated(info, k).repeat_interleave(info.group_size, dim=1)
    weights = (qr @ kr.transpose(2, 3) / math.sqrt(info.head_dim)).softmax(dim=-1)[..., :-1]  # (1, Hq, 1, N-1)
    scores = weights.mean(1).repeat(1, info.num_kv_heads, 1)
    scores = F.pad(scores, (0, 1), value=scores.max().item() + 1)
    assert torch.equal(kept(TOVA(kv_budget=BUDGET), info), top(scores, BUDGET))


def test_observed_attention(info: LayerInfo) -> None:
    q, k, _ = random_qkv(info)
    qr, kr = rotated(info, q), rotated(info, k).repeat_interleave(info.group_size, dim=1)
    logits = qr @ kr.transpose(2, 3) / math.sqrt(info.head_dim)
    attentions = (logits + torch.full_like(logits, float("-inf")).triu(diagonal=1)).softmax(dim=-1)  # eager
    scores = attentions.sum(2) / torch.arange(N, 0, -1)
    scores = scores.view(1, info.num_kv_heads, -1, N).mean(2)
    assert torch.equal(kept(ObservedAttention(kv_budget=BUDGET), info), top(scores, BUDGET))


@pytest.mark.parametrize(("use_covariance", "use_vnorm"), [(True, True), (False, False)])
def test_expected_attention(info: LayerInfo, use_covariance: bool, use_vnorm: bool) -> None:
    q, k, v = random_qkv(info)
    n_sink, future = 4, 512
    # kvpress: statistics of the pre-RoPE queries after the sinks; RoPE matrix averaged over the next positions.
    queries = q[:, :, n_sink:].double()
    mu = queries.mean(dim=2, keepdim=True)
    centered = queries - mu
    cov = torch.einsum("bnsi,bnsj->bnij", centered, centered) / queries.shape[2]
    cos, sin = info.rope.cos_sin(torch.arange(N, N + future))
    d = info.head_dim
    eye, swap = torch.eye(d), torch.zeros(d, d)
    swap[d // 2 :, : d // 2], swap[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    rope = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * swap).mean(dim=0).double()
    mu, cov = (mu.squeeze(2) @ rope.T).float(), (rope @ cov @ rope.T).float()
    keys = rotated(info, k)[:, :, n_sink:].repeat_interleave(info.group_size, dim=1).transpose(2, 3)
    scores = (mu.unsqueeze(2) @ keys).squeeze(2) / math.sqrt(d)
    if use_covariance:
        scores += torch.einsum("bhin,bhij,bhjn->bhn", keys, cov, keys) / d / 2
    scores = scores.softmax(dim=-1).view(1, info.num_kv_heads, info.group_size, -1).mean(dim=2)
    if use_vnorm:
        scores = scores * v[:, :, n_sink:].norm(dim=-1)
    scores = F.pad(scores, (n_sink, 0), value=scores.max().item() + 1)
    policy = ExpectedAttention(kv_budget=BUDGET, use_covariance=use_covariance, use_vnorm=use_vnorm)
    assert torch.equal(kept(policy, info), top(scores, BUDGET))


def test_rotate_half_matrix_matches_rope(info: LayerInfo) -> None:
    """The reference's RoPE-as-a-matrix (kvpress's R = cos I + sin P) is the rotation apply_rope performs."""
    x = torch.randn(3, info.head_dim)
    cos, sin = info.rope.cos_sin(torch.tensor([7]))
    d = info.head_dim
    swap = torch.zeros(d, d)
    swap[d // 2 :, : d // 2], swap[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    matrix = cos[0] * torch.eye(d) + sin[0] * swap
    torch.testing.assert_close(x @ matrix.T, x * cos + rotate_half(x) * sin)


def test_pyramidkv_keeps_the_reference_tokens_in_each_layer_budget(info: LayerInfo) -> None:
    policy = PyramidKV(kv_budget=BUDGET, window_size=8, beta=4)
    budgets = pyramid_budgets(BUDGET, N, 2, 8, 4)
    q, k, v = random_qkv(info)
    for rank in (0, 1):
        layer = ScorerLayer(info, policy)
        layer.rank, layer.num_scored = rank, 2
        fed(layer, q, k, v).end_context()
        assert torch.equal(layer.buffer.view()[2], top(snapkv_reference(info, q, k, 8, 5), budgets[rank]))
        assert layer.buffer.capacity == budgets[rank] + 4  # the block holds this layer's own budget
    assert budgets[0] > BUDGET > budgets[1]


@pytest.mark.parametrize(
    ("budget", "context", "layers", "window", "beta"),
    [(1400, 4096, 30, 64, 20), (2048, 4096, 30, 64, 20), (3000, 4096, 7, 64, 20), (777, 5000, 24, 8, 5)],
)
def test_pyramid_budgets_sum_to_the_uniform_total(budget: int, context: int, layers: int, window: int, beta: int):
    budgets = pyramid_budgets(budget, context, layers, window, beta)
    assert sum(budgets) == budget * layers
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1] >= window
    assert max(budgets) <= context - window


def test_pyramid_falls_back_to_uniform_where_the_pyramid_does_not_fit() -> None:
    assert pyramid_budgets(1024, 4096, 30, 64, 20) == [1024] * 30  # 1024 / 20 < window 64: kvpress falls back
    assert pyramid_budgets(500, 4096, 1, 8, 20) == [500]


def adakv_reference(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """kvpress AdaKVPress.compress: safeguard top int(budget * alpha) per head, prune the bottom pairs across heads.
    Returns the kept mask (Hkv, N)."""
    scores = scores.clone()
    _, hkv, n = scores.shape
    safe = int(budget * alpha)
    scores.scatter_(-1, torch.topk(scores, safe, dim=-1).indices, torch.finfo(scores.dtype).max)
    pruned = torch.topk(-scores.reshape(1, -1), hkv * (n - budget), dim=1).indices.flatten()
    mask = torch.ones(hkv * n, dtype=torch.bool)
    mask[pruned] = False
    return mask.view(hkv, n)


def adakv_layer(info: LayerInfo, budget: int = BUDGET) -> tuple[AdaKVLayer, torch.Tensor, torch.Tensor]:
    q, k, v = random_qkv(info)
    layer = AdaKVLayer(info, AdaKV(kv_budget=budget, window_size=8))
    fed(layer, q, k, v).end_context()
    return layer, q, k


def test_adakv_keeps_the_reference_pairs_in_ragged_heads(info: LayerInfo) -> None:
    layer, q, k = adakv_layer(info)
    mask = adakv_reference(snapkv_reference(info, q, k, 8, 5), BUDGET, 0.2)
    assert layer.ragged is not None
    for head, buffer in enumerate(layer.ragged.heads):
        assert torch.equal(buffer.view()[2][0], mask[head].nonzero()[:, 0])
    lengths = layer.ragged.lengths
    assert sum(lengths) == BUDGET * info.num_kv_heads and len(set(lengths)) > 1


def test_adakv_memory_follows_the_budget(info: LayerInfo) -> None:
    per_token_head = 2 * info.head_dim * 4 + 8  # float32 K and V, an int64 position
    for budget in (20, 40, 60):
        layer, _, _ = adakv_layer(info, budget)
        configured = info.num_kv_heads * (budget + layer.headroom()) * per_token_head
        assert abs(layer.kv_bytes() - configured) <= 0.05 * configured
        assert layer.kv_tokens() == budget


def test_adakv_attention_equals_masked_dense_attention(info: LayerInfo) -> None:
    """kvpress's way (full cache, dropped pairs masked) and the ragged heads give the same decode output."""
    q, k, v = random_qkv(info, n=N + 1, seed=3)
    layer = fed(AdaKVLayer(info, AdaKV(kv_budget=BUDGET, window_size=8)), q[:, :, :N], k[:, :, :N], v[:, :, :N])
    layer.end_context()
    assert layer.ragged is not None
    mask = torch.zeros(info.num_kv_heads, N + 1, dtype=torch.bool)
    for head, buffer in enumerate(layer.ragged.heads):
        mask[head, buffer.view()[2][0]] = True
    mask[:, N] = True  # the decoded token, appended to every head
    got = layer.attend(q[:, :, N:], k[:, :, N:], v[:, :, N:])
    cos, sin = info.rope.cos_sin_range(0, N + 1)
    qr, kr = apply_rope(q, cos, sin)[:, :, N:], apply_rope(k, cos, sin)
    group = info.group_size
    logits = qr @ kr.repeat_interleave(group, dim=1).transpose(2, 3) * info.scaling  # (1, Hq, 1, N+1)
    logits = logits.masked_fill(~mask.repeat_interleave(group, dim=0)[None, :, None], float("-inf"))
    expected = logits.softmax(dim=-1) @ v.repeat_interleave(group, dim=1)
    torch.testing.assert_close(got, expected)


def test_pyramidkv_budgets_under_plain_generate(llama: torch.nn.Module) -> None:
    """The context-manager form numbers the layers too: each layer keeps its own pyramid budget."""
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), PyramidKV(kv_budget=BUDGET, window_size=8, beta=4)(llama):
        out = llama.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    held = [layer.kv_tokens() for layer in out.past_key_values.layers]
    assert held == [b + 2 for b in pyramid_budgets(BUDGET, N, 2, 8, 4)]  # 2 decode steps appended
