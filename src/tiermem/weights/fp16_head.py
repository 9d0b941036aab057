"""The LM head held in float16 and multiplied by fbgemm's fp16 GEMM (a model transformation, the ``auto`` weights).

A decode step's LM head reads the whole vocabulary table for one row: for SmolLM2 49152 x 576 weights, the largest
single read of the step. PyTorch's weight-only int8 kernel (``aten._weight_int8pack_mm``) reads it at about a third
of the machine's bandwidth; fbgemm's fp16 GEMM (``quantized::linear_dynamic_fp16``, shipped in PyTorch's x86 wheels)
reads twice the bytes faster than that (BENCHMARKS.md, "The LM head in fp16"). Its arithmetic is float32: the
weights are widened from float16 in registers and the activations are the float32 ones, so nothing is quantized but
the stored weight, which float16 holds more finely than the int8 head did (11 significant bits against a per-row
int8 step; bfloat16 weights, 8 bits, fit float16 exactly in its normal range).

Logits come back in float32 (the kernel's output), not rounded to the model's dtype: a bfloat16 logit near 20 steps
by 0.125, enough to tie or swap the top candidates of a greedy step.

The table is packed :data:`BLOCK_ROWS` output rows at a time (the packer takes float32: the whole table at once
would hold a 113 MB float32 copy of SmolLM2's head at load), one GEMM per block, the outputs joined.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn

BLOCK_ROWS = 16384  # output rows packed together: a float32 block of 16384 x 576 is 38 MB during the load


@cache
def fp16_gemm_available() -> bool:
    """Whether this PyTorch has fbgemm's fp16 GEMM and it computes a small product correctly."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        weight = torch.arange(12, dtype=torch.float32).view(3, 4) / 8
        x = torch.ones(1, 4)
        packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
        out = torch.ops.quantized.linear_dynamic_fp16(x, packed)
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.equal(out, x @ weight.T))


class Fp16Linear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight (N, K) is packed in float16 blocks for fbgemm; ``x`` (..., K) in any
    float dtype -> float32 (..., N)."""

    def __init__(self, linear: nn.Linear, block_rows: int = BLOCK_ROWS):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Fp16Linear takes a bias-free Linear (an LM head)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed: list[Any] = [
            torch.ops.quantized.linear_prepack_fp16(weight[start : start + block_rows].float(), None)
            for start in range(0, self.out_features, block_rows)
        ]
        self.nbytes = weight.numel() * torch.float16.itemsize  # the packed weights (not parameters or buffers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        parts = [torch.ops.quantized.linear_dynamic_fp16(flat, packed) for packed in self.packed]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 (fbgemm)"
