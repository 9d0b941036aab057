"""Layer streaming: identical outputs to resident weights, k slots at most, clear errors before any compute."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.test_cli import assert_one_line_error, run_cli
from tiermem.errors import TiermemError
from tiermem.weights.prefetch import LayerPrefetcher
from tiermem.weights.shards import open_store, read_header
from tiermem.weights.stream import StreamConfig, StreamedWeights, load_streamed

LAYERS = 5


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    """A saved 5-layer tiny Llama (tied head) and the resident model it came from."""
    folder = tmp_path_factory.mktemp("src")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder, model


def streamed(source: tuple[Path, LlamaForCausalLM], cache: Path, **config: int | str) -> StreamedWeights:
    return load_streamed(source[0], torch.float32, StreamConfig(**config), cache)


@pytest.mark.parametrize("loader", ["mmap", "read"])
@pytest.mark.parametrize(("k", "evict"), [(1, 1), (2, 1), (3, 3), (LAYERS, 1)])
def test_streamed_logits_identical_to_resident(source, tmp_path: Path, k: int, evict: int, loader: str) -> None:
    placement = streamed(source, tmp_path, prefetch_layers=k, evict_layers=evict, loader=loader)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            for _ in range(3):  # several passes: layers are evicted and reloaded in between
                assert torch.equal(placement.model(ids).logits, source[1](ids).logits)
        assert placement.prefetcher.max_held <= k
        if k < LAYERS:
            assert placement.prefetcher.evictions > 0
    finally:
        placement.close()


def test_generation_identical_and_never_more_than_k_layers(source, tmp_path: Path) -> None:
    """Greedy decoding through the engine's KV cache gives the resident tokens; k=2 slots hold 2 layers at most,
    checked inside every layer's forward."""
    from tiermem.engine import GenerationConfig, forward, prefill
    from tiermem.memory.full import Full

    placement = streamed(source, tmp_path, prefetch_layers=2)
    held: list[list[int]] = []
    handles = [
        layer.register_forward_hook(lambda *_: held.append(placement.prefetcher.held()))
        for layer in placement.model.model.layers
    ]

    def greedy(model: LlamaForCausalLM) -> list[int]:
        from tiermem.attention import patched_attention
        from tiermem.cache import TierCache

        cache = TierCache(model, Full())
        ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(2))
        out = []
        with torch.inference_mode(), patched_attention(model):
            logits = prefill(model, cache, ids, GenerationConfig(chunk_size=8).chunk_size)
            for _ in range(8):
                assert logits is not None
                out.append(int(logits.argmax()))
                logits = forward(model, cache, torch.tensor([[out[-1]]]))
        return out

    try:
        assert greedy(placement.model) == greedy(source[1])
        assert held and max(len(h) for h in held) <= 2
        assert placement.prefetcher.max_held == 2
    finally:
        for handle in handles:
            handle.remove()
        placement.close()


def test_store_round_trip_and_layout(source, tmp_path: Path) -> None:
    placement = streamed(source, tmp_path)
    try:
        store = placement.store
        assert len(store.layers) == LAYERS
        assert placement.k == LAYERS  # no limit: every layer stays once loaded
        names = {e.name for e in store.resident.tensors}
        assert names == {"model.embed_tokens.weight", "model.norm.weight"}  # the tied head is not stored twice
        layer0 = load_file(str(store.layers[0].path))
        assert torch.equal(layer0["model.layers.0.mlp.up_proj.weight"], source[1].model.layers[0].mlp.up_proj.weight)
    finally:
        placement.close()


def _store_folder(source, cache: Path) -> Path:
    streamed(source, cache).close()  # converts once
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return folder


def test_truncated_shard_is_a_clear_error(source, tmp_path: Path) -> None:
    folder = _store_folder(source, tmp_path)
    shard = folder / "layer_0003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TiermemError, match=r"layer_0003\.safetensors is truncated"):
        streamed(source, tmp_path)


def test_corrupt_header_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(TiermemError, match="corrupt"):
        read_header(bad)


def test_missing_tensor_is_a_clear_error(source, tmp_path: Path) -> None:
    folder = _store_folder(source, tmp_path)
    shard = folder / "layer_0001.safetensors"
    tensors = load_file(str(shard))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(TiermemError, match=r"lacks tensors the model needs: model\.layers\.1\.self_attn\.k_proj"):
        streamed(source, tmp_path)


def test_missing_layer_file_is_a_clear_error(source, tmp_path: Path) -> None:
    folder = _store_folder(source, tmp_path)
    (folder / "layer_0004.safetensors").unlink()
    with pytest.raises(TiermemError, match=r"layer_0004\.safetensors is missing"):
        open_store(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_layers"] == LAYERS


def test_limits_below_one_layer_are_refused(source, tmp_path: Path) -> None:
    with pytest.raises(TiermemError, match="below the resident tensors"):
        streamed(source, tmp_path, weight_memory=30_000)
    with pytest.raises(TiermemError, match="does not fit"):
        streamed(source, tmp_path, weight_memory=200_000, prefetch_layers=LAYERS)
    with pytest.raises(TiermemError, match="evict-layers"):
        streamed(source, tmp_path, prefetch_layers=2, evict_layers=3)


def test_a_failed_load_raises_in_the_waiting_thread_every_time(source, tmp_path: Path) -> None:
    folder = _store_folder(source, tmp_path)
    store = open_store(folder)  # validated while whole; the file is cut afterwards, while the model runs
    shard = folder / "layer_0000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    prefetcher = LayerPrefetcher(store, 2, loader="read")
    try:
        for _ in range(2):  # a retry loads again and fails again, never a stale "ready"
            with pytest.raises(TiermemError, match="truncated while reading"):
                prefetcher.acquire(0)
    finally:
        prefetcher.close()


def test_prefetcher_rejects_bad_k(source, tmp_path: Path) -> None:
    folder = _store_folder(source, tmp_path)
    with pytest.raises(ValueError):
        LayerPrefetcher(open_store(folder), LAYERS + 1)


def test_cli_stream_matches_resident(capsys, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIERMEM_CACHE", str(tmp_path))
    common = ["generate", "--model", str(tiny_model_dir), "--context", "The pass key is 4321. " * 8,
              "--question", "What is the pass key?", "--max-new-tokens", "8", "--json"]  # fmt: skip
    code, out, _ = run_cli(capsys, *common)
    assert code == 0
    resident = json.loads(out)
    code, out, _ = run_cli(capsys, *common, "--weights", "stream", "--prefetch-layers", "1")
    assert code == 0
    stream = json.loads(out)
    assert stream["text"] == resident["text"]
    extra = stream["extra"]
    assert extra["weights"] == "stream" and extra["weight_layers_held"] == 1
    assert extra["weight_loads"] >= 2 * (1 + stream["new_tokens"])  # 2 layers per pass, one pass per forward


def test_cli_weight_errors(capsys, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIERMEM_CACHE", str(tmp_path))
    base = ["generate", "--model", str(tiny_model_dir), "--context", "hello there", "--max-new-tokens", "2"]
    code, _, err = run_cli(capsys, *base, "--weights", "stream", "--weight-memory", "1KB")
    assert_one_line_error(code, err, "below the resident tensors")
    code, _, err = run_cli(capsys, *base, "--weight-memory", "1KB")
    assert_one_line_error(code, err, "use --weights stream")
    code, _, err = run_cli(capsys, *base, "--prefetch-layers", "2")
    assert_one_line_error(code, err, "need --weights stream")


@pytest.fixture()
def broken(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny model folder for a test to damage (with its own tiermem cache)."""
    import shutil

    monkeypatch.setenv("TIERMEM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def assert_both_placements_refuse(capsys, folder: Path, needle: str) -> None:
    for placement in ("resident", "stream"):
        code, _, err = run_cli(capsys, "generate", "--model", str(folder), "--context", "hi", "--weights", placement)
        assert_one_line_error(code, err, needle)


def test_truncated_checkpoint_is_a_clear_error_for_resident_and_stream(capsys, broken: Path) -> None:
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_both_placements_refuse(capsys, broken, str(broken))


def test_missing_tensor_in_checkpoint_is_a_clear_error(capsys, broken: Path) -> None:
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert_both_placements_refuse(capsys, broken, "lacks tensors the model needs: model.layers.1.mlp.up_proj.weight")
