"""Flash FFN loading: exact at density 1, a consistent neuron window, reads only what became active."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import forward, prefill
from tiermem.errors import TiermemError
from tiermem.memory.full import Full
from tiermem.weights.flash import FlashConfig, FlashWeights


def decode_logits(model: torch.nn.Module, steps: int = 6) -> list[torch.Tensor]:
    """Prefill 12 random ids, then feed ``steps`` fixed ids one at a time; the logits of every forward."""
    ids = torch.randint(0, 128, (1, 12 + steps), generator=torch.Generator().manual_seed(3))
    cache = TierCache(model, Full())
    out = []
    with torch.inference_mode(), patched_attention(model):
        out.append(prefill(model, cache, ids[:, :12], 12))
        for i in range(12, 12 + steps):
            out.append(forward(model, cache, ids[:, i : i + 1]))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # SwiGLU and GeGLU
def test_density_one_is_exact(arch: str, tmp_path: Path) -> None:
    reference = decode_logits(tiny(arch))
    model = tiny(arch)
    flash = FlashWeights(model, tmp_path, FlashConfig(density=1.0, window=2))
    try:
        for got, want in zip(decode_logits(model), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert flash.counters.prefill_bytes > 0
        # Every neuron is active at density 1: the window keeps them all, so only the first token reads.
        per_layer = flash.mlps[0].intermediate * flash.mlps[0].row_bytes
        assert flash.counters.decode_bytes == per_layer * len(flash.mlps)
    finally:
        flash.close()


def test_window_holds_exactly_the_recent_neurons(tmp_path: Path) -> None:
    model = tiny("llama")
    flash = FlashWeights(model, tmp_path, FlashConfig(density=0.25, window=3))
    mlp = flash.mlps[1]
    bundles = torch.from_file(str(mlp.path), size=mlp.intermediate * 2 * mlp.hidden).view(mlp.intermediate, -1)
    history: list[set[int]] = []
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            for _ in range(12):
                x = torch.randn(1, 1, mlp.hidden, generator=generator)
                mlp(x)
                act = mlp.act_fn(mlp.gate_proj(x))[0, 0]
                history.append(set(act.abs().topk(mlp.active_per_token).indices.tolist()))
                window = mlp.window
                held = window.neuron_at[: window.used].tolist()
                assert set(held) == set().union(*history[-3:])  # the last 3 tokens' neurons, nothing else
                assert len(held) == len(set(held)) <= window.rows.shape[0]
                for row, neuron in enumerate(held):
                    assert int(window.row_of[neuron]) == row
                    assert torch.equal(window.rows[row], bundles[neuron])
    finally:
        flash.close()


def test_repeated_token_reads_nothing_new(tmp_path: Path) -> None:
    model = tiny("llama")
    flash = FlashWeights(model, tmp_path, FlashConfig(density=0.5, window=2))
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            mlp = flash.mlps[0]
            first = mlp(x)
            read = flash.counters.decode_bytes
            assert read == mlp.active_per_token * mlp.row_bytes
            again = mlp(x)
        assert flash.counters.decode_bytes == read
        assert torch.equal(first, again)
        assert flash.stats()["ffn_bytes_per_token_resident"] == 2 * 3 * 128 * 64 * 4
    finally:
        flash.close()


def test_bad_flash_settings() -> None:
    with pytest.raises(TiermemError, match="density"):
        FlashConfig(density=0.0)
    with pytest.raises(TiermemError, match="window"):
        FlashConfig(window=0)
