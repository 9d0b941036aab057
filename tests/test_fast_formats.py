"""The ``fast`` format preset (issue 11, "fast by default"): the preset's choices, and weights kept in the
checkpoint's bits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import tiny
from tiermem import formats
from tiermem.formats import GGUF_TYPES_FILE, apply_preset, weight_modes
from tiermem.weights.quant import (
    DEQUANTIZE_ROWS,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    dequantize_int4,
    int4_unpackable,
    quantize_int4,
    quantize_weights,
    unpack_int4,
)


def test_weight_modes_follow_the_gguf_types() -> None:
    types = {
        "blk.0.attn_q.weight": "Q4_1",
        "blk.3.ffn_down.weight": "Q4_1",
        "blk.2.ffn_down.weight": "Q4_K",  # 4 bits, but min/max int4 codes would round it a second time: int8
        "blk.3.attn_v.weight": "Q6_K",  # 6 bits: int8, never fewer bits than the source
        "blk.1.ffn_up.weight": "Q5_0",
        "blk.2.attn_norm.weight": "F32",
        "token_embd.weight": "Q4_0",  # not a decoder Linear: the head is int8 anyway
    }
    assert weight_modes(types) == {"0.self_attn.q_proj": "int4", "3.mlp.down_proj": "int4"}
    assert weight_modes(None) == {}


def test_auto_quantizes_each_layer_as_its_source() -> None:
    model = tiny("llama")
    layers = len(model.model.layers)
    report = quantize_weights(model, "auto", 32, {"0.mlp.down_proj": "int4", "0.self_attn.q_proj": "int4"})
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4WeightOnlyLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4WeightOnlyLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8WeightOnlyLinear)
    assert isinstance(model.model.layers[layers - 1].mlp.down_proj, Int8WeightOnlyLinear)
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert (report.int4_modules, report.label) == (2, "int4-g32+int8")
    every = {f"{i}.{name}": "int4" for i in range(layers) for name in formats.GGUF_LINEAR_NAMES.values()}
    assert quantize_weights(tiny("llama"), "auto", 32, every).label == "int4-g32"  # the head alone in int8
    assert quantize_weights(tiny("llama"), "auto", 32, {}).label == "int8"


def _preset(formats_name: str, **given: str | None) -> argparse.Namespace:
    args = argparse.Namespace(formats=formats_name, dtype=None, weights_quant=None, kv_dtype=None, weights="resident")
    vars(args).update(given)
    apply_preset(args)
    return args


@pytest.mark.parametrize("bf16", [True, False])
def test_the_fast_preset_and_its_overrides(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(formats, "cpu_has_bf16", lambda: bf16)
    fast = _preset("fast")
    picked = (fast.dtype, fast.weights_quant, fast.kv_dtype)
    assert picked == (("bfloat16", "auto", "int8") if bf16 else ("float32", "none", "auto"))
    exact = _preset("exact")
    assert (exact.dtype, exact.weights_quant, exact.kv_dtype) == ("float32", "none", "auto")
    own = _preset("fast", dtype="float32")  # an explicit float32 is an exact run
    assert (own.dtype, own.weights_quant, own.kv_dtype) == ("float32", "none", "auto")
    streamed = _preset("fast", weights="stream")  # streamed layers are read as stored
    assert streamed.weights_quant == "none"
    kept = _preset("fast", kv_dtype="float16", weights_quant="int8")
    assert (kept.kv_dtype, kept.weights_quant) == ("float16", "int8")


def test_load_auto_reads_the_recorded_source_types(tiny_model_dir: Path) -> None:
    from tiermem.models import load

    types = {"blk.0.ffn_gate.weight": "Q4_1", "blk.0.ffn_up.weight": "Q8_0"}
    (tiny_model_dir / GGUF_TYPES_FILE).write_text(json.dumps(types))
    try:
        lm = load(str(tiny_model_dir), "bfloat16", weights_quant="auto")
    finally:
        (tiny_model_dir / GGUF_TYPES_FILE).unlink()
    mlp = lm.model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, Int4WeightOnlyLinear) and isinstance(mlp.up_proj, Int8WeightOnlyLinear)
    assert lm.weights_format == "int4-g32+int8"


@pytest.mark.parametrize(("n", "k"), [(64, 128), (192, 576), (128, 96)])
def test_unpack_int4_reads_the_cpu_packing(n: int, k: int) -> None:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert int4_unpackable(n, k)
    assert torch.equal(unpack_int4(packed, n, k).to(torch.int32), codes)
    assert not int4_unpackable(96, k)  # not whole blocks of 64 output rows: the kernel runs every chunk


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_prefill_chunks_widen_the_weight_for_the_same_result(mode: str) -> None:
    linear = nn.Linear(96, 128, bias=True).to(torch.bfloat16)
    module = Int4WeightOnlyLinear(linear, 32) if mode == "int4" else Int8WeightOnlyLinear(linear)
    x = torch.randn(1, DEQUANTIZE_ROWS + 3, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        widened = module(x)  # enough rows: the dequantized weight in a bf16 GEMM
        by_row = torch.cat([module(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)  # the kernel, row by row
    torch.testing.assert_close(widened.float(), by_row.float(), atol=0.05, rtol=0.02)
    if mode == "int4":
        assert isinstance(module, Int4WeightOnlyLinear) and module.unpackable
        q, scales, zeros = quantize_int4(linear.weight, 32, torch.bfloat16)
        torch.testing.assert_close(module.dequantized(torch.float32), dequantize_int4(q, scales, zeros, 32))
