from __future__ import annotations

import torch

from tiermem.kvstore import KVBuffer


def filled(n: int) -> KVBuffer:
    buffer = KVBuffer(num_heads=2, head_dim=4, dtype=torch.float32)
    for start in range(0, n, 3):
        t = min(3, n - start)
        keys = torch.arange(start, start + t, dtype=torch.float32).view(1, 1, t, 1).expand(1, 2, t, 4)
        buffer.append(keys, -keys, torch.arange(start, start + t))
    return buffer


def test_append_keeps_order_and_positions() -> None:
    buffer = filled(10)
    keys, values, positions = buffer.view()
    assert keys.shape == (1, 2, 10, 4)
    assert torch.equal(keys[0, 1, :, 0], torch.arange(10.0))
    assert torch.equal(values, -keys)
    assert torch.equal(positions, torch.arange(10).expand(2, 10))
    assert buffer.capacity >= 10


def test_keep_shared_and_per_head() -> None:
    buffer = filled(10)
    buffer.keep(torch.tensor([0, 1, 8, 9]))
    assert torch.equal(buffer.view()[2][0], torch.tensor([0, 1, 8, 9]))
    buffer.keep(torch.tensor([[0, 1], [2, 3]]))
    assert torch.equal(buffer.view()[2], torch.tensor([[0, 1], [8, 9]]))
    assert torch.equal(buffer.view()[0][0, :, :, 0], torch.tensor([[0.0, 1.0], [8.0, 9.0]]))


def test_reserve_avoids_reallocation_and_keep_can_shrink() -> None:
    buffer = KVBuffer(num_heads=1, head_dim=2, dtype=torch.float32)
    buffer.reserve(100)
    block = buffer.keys
    buffer.append(torch.ones(1, 1, 60, 2), torch.ones(1, 1, 60, 2), torch.arange(60))
    assert buffer.keys is block
    buffer.keep(torch.arange(50, 60), capacity=12)
    assert buffer.capacity == 12 and buffer.length == 10
    assert buffer.peak_nbytes >= 100 * 2 * 4 * 2
    assert buffer.nbytes == 12 * 2 * 4 * 2 + 12 * 8


def test_paged_buffer_commits_pages_as_tokens_arrive_and_returns_them() -> None:
    from tiermem.kvstore import PagedKVBuffer
    from tiermem.kvstore.paged import PAGE

    paged = PagedKVBuffer(num_heads=2, head_dim=4, dtype=torch.float32, reserve_tokens=1 << 16)
    grown = filled(10)
    for start in range(0, 10, 3):
        t = min(3, 10 - start)
        keys = torch.arange(start, start + t, dtype=torch.float32).view(1, 1, t, 1).expand(1, 2, t, 4)
        paged.append(keys, -keys, torch.arange(start, start + t))
    assert all(torch.equal(a, b) for a, b in zip(paged.view(), grown.view(), strict=True))
    assert paged.capacity == 1 << 16 and paged.reallocations == 1  # one reservation, never copied to grow
    assert paged.nbytes == 2 * 2 * PAGE + 2 * PAGE  # K and V rows of 10 tokens, positions rows: one page each
    paged.keep(torch.tensor([8, 9]))
    assert torch.equal(paged.view()[2][0], torch.tensor([8, 9]))


def test_concat_buffer_reallocates_every_append() -> None:
    from tiermem.kvstore import ConcatKVBuffer

    buffer = ConcatKVBuffer(num_heads=1, head_dim=2, dtype=torch.float32)
    for i in range(5):
        buffer.append(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.tensor([i]))
    assert buffer.reallocations == 5 and buffer.capacity == 5
