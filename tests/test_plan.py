"""The planner: the cost model's arithmetic, the choices it makes, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from tests.test_cli import assert_one_line_error, run_cli
from tiermem.errors import TiermemError
from tiermem.plan import probe as probe_module
from tiermem.plan.choose import candidates, choose, command
from tiermem.plan.cost import Config, Shapes, predict
from tiermem.plan.probe import Machine

MACHINE = Machine(
    gemm_flops=300e9, gemv_bytes=30e9, load_bytes=5e9, disk_bytes=0.5e9, layer_overhead_s=1e-3,
    base_rss=300 * 2**20, threads=2, cpu="test",
)  # fmt: skip
GIB = 2**30
# TinyLlama-1.1B's shape with a 49152 vocabulary: 22 layers of ~176 MB in fp32.
BIG = Shapes.from_config(
    LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=4096)
)  # fmt: skip


def test_shapes_count_parameters() -> None:
    attention = 2 * 2048 * 2048 + 2 * 2048 * 4 * 64
    assert BIG.layer_params == attention + 3 * 2048 * 5632 + 2 * 2048
    assert BIG.resident_bytes == (49152 * 2048 + 2048) * 4  # tied head: stored once
    assert BIG.kv_bytes_per_token == 22 * 2 * 4 * 64 * 4
    assert 4.2e9 < BIG.weight_bytes < 4.4e9


def test_decode_is_bandwidth_bound_and_prefill_compute_bound() -> None:
    config = Config("resident", "full", hot_tokens=512, kv_ram_bytes=0, context=512)
    p = predict(BIG, config, MACHINE)
    assert p.parts["weights"] == pytest.approx(22 * BIG.layer_bytes / MACHINE.gemv_bytes)
    per_layer_gemm = 2 * 512 * BIG.layer_params / MACHINE.gemm_flops
    assert p.prefill_s > 22 * per_layer_gemm  # a 512-token chunk: FLOPs, not bytes, set the time


def test_streaming_costs_loads_unless_every_layer_is_held() -> None:
    resident = predict(BIG, Config("resident", "full", 512, 0, 512), MACHINE)
    held = predict(BIG, Config("stream", "full", 512, 0, 512, k=22), MACHINE)
    cold = predict(BIG, Config("stream", "full", 512, 0, 512, k=3, warm_page_cache=False), MACHINE)
    assert held.decode_s == pytest.approx(resident.decode_s)
    assert cold.parts["load stall"] > 0 and cold.decode_s > resident.decode_s
    assert cold.peak_bytes < resident.peak_bytes - 3 * GIB


def test_choices() -> None:
    roomy = choose(candidates(BIG, MACHINE, 8 * GIB, 2048, 32))
    assert roomy.label == "resident + full"
    tight = choose(candidates(BIG, MACHINE, int(1.5 * GIB), 2048, 32))
    assert tight.config.weights == "stream" and tight.exact and tight.prediction.peak_bytes <= 1.5 * GIB
    assert "--weights stream --weight-memory" in command("m", tight, BIG)
    long = choose(candidates(BIG, MACHINE, 8 * GIB, 32768, 32))  # past the 4096 trained positions
    assert long.config.kv_policy.startswith("infllm-small --kv-memory") and not long.exact
    with pytest.raises(TiermemError, match="no configuration fits"):
        choose(candidates(BIG, MACHINE, 512 * 2**20, 2048, 32))


def test_probe_measures_and_caches(tmp_path: Path) -> None:
    cache = tmp_path / "probe.json"
    machine = probe_module.probe(cache, tmp_path, file_size=8 * 2**20)
    assert machine.gemm_flops > 1e8 and machine.gemv_bytes > 1e7 and machine.disk_bytes > 0
    assert machine.layer_overhead_s > 0 and machine.base_rss > 0
    assert json.loads(cache.read_text())["machine"]["cpu"] == machine.cpu
    assert probe_module.probe(cache, tmp_path) == machine  # the cached measurement is reused
    assert not list(tmp_path.glob("tiermem-probe-*"))  # the probe's file is gone


def test_cli_plan(capsys, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERMEM_CACHE", str(tmp_path))
    monkeypatch.setattr(probe_module, "probe", lambda *a, **k: MACHINE)
    code, out, _ = run_cli(capsys, "plan", "--model", str(tiny_model_dir), "--memory", "2GB", "--context", "512")
    assert code == 0
    assert "choice: resident + full" in out and "run: tiermem generate" in out
    code, _, err = run_cli(capsys, "plan", "--model", str(tiny_model_dir), "--memory", "1MB", "--context", "512")
    assert_one_line_error(code, err, "no configuration fits")


def test_layer_profile_calibrates_the_prediction() -> None:
    from tiermem.plan.layer_profile import profile_layer

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)  # fmt: skip
    profile = profile_layer(config, "full", context=1024, hot_tokens=1040)
    assert profile.decode_s > 0 and profile.chunk_s > 0 and profile.hot_tokens == 1024
    shapes = Shapes.from_config(config)
    plain = Config("resident", "full", 1040, 0, 1024)
    measured = Config("resident", "full", 1024, 0, 1024, profile=profile)
    p = predict(shapes, measured, MACHINE)
    assert p.parts["layers (measured)"] == pytest.approx(4 * profile.decode_s, rel=1e-6)  # same hot set
    assert "weights" in predict(shapes, plain, MACHINE).parts
    longer = predict(shapes, Config("resident", "full", 4000, 0, 4000, profile=profile), MACHINE)
    assert longer.decode_s > p.decode_s and longer.prefill_s > p.prefill_s
