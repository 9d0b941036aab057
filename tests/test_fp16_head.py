"""The LM head in float16 on fbgemm's fp16 GEMM (``tiermem.weights.fp16_head``): what it computes, its blocks, the
load paths that build it, and the int8 head where the GEMM is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import tiny
from tiermem.weights import quant
from tiermem.weights.fp16_head import Fp16Linear, fp16_gemm_available
from tiermem.weights.quant import Int8WeightOnlyLinear, quantize_weights

needs_fbgemm = pytest.mark.skipif(not fp16_gemm_available(), reason="this PyTorch has no fbgemm fp16 GEMM")


def _linear(n: int, k: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.05)
    return linear.to(dtype)


@needs_fbgemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp16_head_is_a_float32_product_with_the_weight_in_float16(dtype: torch.dtype) -> None:
    linear = _linear(200, 96, dtype)
    head = Fp16Linear(linear)
    x = torch.randn(3, 5, 96).to(dtype)
    out = head(x)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 200)  # logits stay in float32
    reference = x.double() @ linear.weight.detach().half().double().T  # the only rounding: the stored weight
    assert torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-5)
    if dtype == torch.bfloat16:  # bfloat16 weights fit float16 exactly: the product of the model's own weights
        assert torch.allclose(out.double(), x.double() @ linear.weight.detach().double().T, rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_fp16_head_blocks_join_to_the_whole_product() -> None:
    linear = _linear(100, 64)
    x = torch.randn(2, 64)
    whole, blocks = Fp16Linear(linear), Fp16Linear(linear, block_rows=32)  # 32 + 32 + 32 + 4 rows
    assert len(blocks.packed) == 4
    assert torch.equal(whole(x), blocks(x))
    assert whole.nbytes == 100 * 64 * 2


@needs_fbgemm
def test_auto_holds_the_head_in_float16_and_counts_its_bytes() -> None:
    model = tiny("llama")
    table = model.lm_head.weight.detach().clone()
    report = quantize_weights(model, "auto", 32, {})
    assert isinstance(model.lm_head, Fp16Linear) and report.head == "fp16"
    assert report.label == "int8 (head fp16)"
    assert report.bytes_after >= model.lm_head.nbytes > 0
    x = torch.randn(1, table.shape[1])
    assert torch.allclose(model.lm_head(x), x @ table.half().float().T, rtol=1e-5, atol=1e-5)


def test_without_the_fp16_gemm_auto_keeps_the_int8_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "fp16_gemm_available", lambda: False)
    model = tiny("llama")
    report = quantize_weights(model, "auto", 32, {})
    assert isinstance(model.lm_head, Int8WeightOnlyLinear) and report.label == "int8"


@needs_fbgemm
def test_the_resident_loader_builds_the_fp16_head(tiny_model_dir: Path) -> None:
    from tiermem.models import load

    lm = load(str(tiny_model_dir), "bfloat16", weights_quant="auto")
    assert isinstance(lm.model.lm_head, Fp16Linear)
    assert lm.weights_format == "int8 (head fp16)"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_a_large_vocabulary_head_stays_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny("llama")
    monkeypatch.setattr(quant, "FP16_HEAD_MAX_BYTES", model.lm_head.weight.numel() * 2 - 1)  # one byte too small
    report = quantize_weights(model, "auto", 32, {})
    assert isinstance(model.lm_head, Int8WeightOnlyLinear) and report.head == "int8"
