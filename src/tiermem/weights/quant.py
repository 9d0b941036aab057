"""Weight-only quantization as a model transformation (gpt-fast's ``quantize.py`` style).

:func:`quantize_weights` swaps every ``nn.Linear`` of a plain HF model for a quantized module in place; the model
code never learns about it. The matmuls run on the CPU kernels PyTorch ships (torch 2.13):

- ``int8``: symmetric, one scale per output channel (gpt-fast's ``WeightOnlyInt8QuantHandler``),
  ``y = (x @ Wq.T) * s`` by ``aten._weight_int8pack_mm``.
- ``int4``: asymmetric, one scale and zero point per ``group_size`` input columns of each output row (gpt-fast's
  ``WeightOnlyInt4QuantHandler``: ``scale = (max - min) / 15``, ``zero = min + 8 * scale``), packed by
  ``aten._convert_weight_to_int4pack_for_cpu`` and multiplied by ``aten._weight_int4pack_mm_for_cpu``.

Departures from gpt-fast: int8 clamps to [-127, 127] (symmetric, so -W quantizes to -Wq); int4 pads a row whose
length is not a multiple of the group with zero columns (gpt-fast pads to a multiple of 1024 for its CUDA tiles;
the CPU kernel only needs whole groups), and ``x`` is padded to match at run time. The LM head is quantized too (as
gpt-fast does), but to int8 under ``int4``: llama.cpp's 4-bit presets keep ``output.weight`` at 6-8 bits, and the
bundled SmolLM2 GGUF (Q4_1) holds its tied embedding table in Q8_0. Measured on 512 held-out Wikipedia tokens
(benchmarks/decode_formats.py ppl): int4 group 32 with a 4-bit head +6.9% (bf16) / +8.0% (fp32) perplexity, with an
int8 head -0.2% / +0.25%. With tied embeddings the table stays in float for the lookup, so the head's quantized copy
is extra memory there (counted in :class:`QuantReport`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from tiermem.errors import TiermemError

WEIGHT_QUANTS = ("none", "int8", "int4", "auto")  # auto: int4 where the GGUF source is Q4_1 (tiermem.formats)
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP = 32  # gpt-fast's command-line default; 128 is coarser and cannot split SmolLM2's 576 evenly


def quantize_int8(weight: torch.Tensor, param_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``weight`` (N, K) float -> int8 (N, K) and scales (N,) in
    ``param_dtype`` (the kernel's activation dtype), with ``weight ~= q * scales[:, None]``; codes are rounded
    against the scales as stored."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(param_dtype).float()
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(
    weight: torch.Tensor, group_size: int, param_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit: ``weight`` (N, K) with K a multiple of ``group_size`` -> codes (N, K) int32 in
    0..15, scales and zero points (N, K / group_size), with ``w ~= (q - 8) * scale + zero``.

    Scales and zeros are rounded to ``param_dtype`` (the kernel reads them in the activations' dtype) before the
    codes are chosen, and the codes are rounded against the rounded values. gpt-fast rounds the codes against the
    float32 values and casts after; in bfloat16 the zero point (about the group's mean) then moves by up to 2^-9 of
    its size, which can be a sizeable part of a 4-bit step for a narrow group far from zero.
    """
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-6).to(param_dtype).float()  # gpt-fast's floor: constant groups
    zeros = (low + 8 * scales).to(param_dtype).float()  # the kernel computes (q - 8) * scale + zero
    q = torch.round((w - zeros) / scales + 8).clamp(0, 15).to(torch.int32).view(n, k)
    return q, scales.squeeze(-1), zeros.squeeze(-1)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float (N, K) weight that :func:`quantize_int4`'s codes stand for (the reference for tests)."""
    n, k = q.shape
    w = (q.view(n, k // group_size, group_size).float() - 8) * scales[..., None] + zeros[..., None]
    return w.view(n, k)


DEQUANTIZE_ROWS = 128  # from this many input rows (a prefill chunk) widening the weight for a bf16 GEMM is faster
BLOCK_N = 64  # the CPU int4 packer's block of output rows (aten/src/ATen/native/cpu/int4mm_kernel.cpp)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The codes (N, K) uint8 in 0..15 that ``_convert_weight_to_int4pack_for_cpu`` packed into ``packed``
    (N, K / 2): in each block of 64 output rows, byte ``k * 32 + r`` holds row ``r``'s code in its low nibble and
    row ``r + 32``'s in its high nibble. Needs N a multiple of 64 (:func:`int4_unpackable` checks the layout)."""
    blocks = packed.view(n // BLOCK_N, k, BLOCK_N // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # (N / 64, K, 64)
    return codes.transpose(1, 2).reshape(n, k)


@cache
def int4_unpackable(n: int, k: int) -> bool:
    """Whether :func:`unpack_int4` reads this torch's packing of an (N, K) weight: N a multiple of 64 and a round
    trip of random codes exact (the layout is the kernel's private choice; if a release changes it, prefill falls
    back to the kernel instead of reading garbage)."""
    if n % BLOCK_N:
        return False
    probe = torch.randint(0, 16, (BLOCK_N, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    return packed.shape == (BLOCK_N, k // 2) and torch.equal(unpack_int4(packed, BLOCK_N, k).to(torch.int32), probe)


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with int8 weights (N, K) and per-output-channel scales (N,); activations stay in float."""

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype
        q, scales = quantize_int8(linear.weight, dtype)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(dtype))  # the kernel wants scales in the activations' dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def concatenated(cls, parts: list[Int8WeightOnlyLinear]) -> Int8WeightOnlyLinear:
        """One module whose output is the parts' outputs side by side: their rows (and scales) stacked. No biases."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        fused.register_buffer("weight", torch.cat([p.weight for p in parts]))
        fused.register_buffer("scales", torch.cat([p.scales for p in parts]))
        fused.register_buffer("bias", None)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., K) -> (..., N)."""
        flat = x.reshape(-1, self.in_features)
        if x.dtype == torch.float32:  # the kernel's float32 path is far slower than a float matmul (measured)
            out = F.linear(flat, self.weight.to(torch.float32) * self.scales[:, None].float())
        elif flat.shape[0] >= DEQUANTIZE_ROWS:  # a prefill chunk: widening for a bf16 GEMM is 2.4x faster at 512 rows
            out = F.linear(flat, (self.weight.to(torch.float32) * self.scales[:, None].float()).to(x.dtype))
        else:
            scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, scales)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with 4-bit weights packed for the CPU kernel, one scale and zero per ``group_size`` inputs."""

    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        self.padded_in = -(-self.in_features // group_size) * group_size
        weight = linear.weight.detach()
        if self.padded_in != self.in_features:  # zero columns meet zero-padded inputs: they add nothing
            weight = F.pad(weight, (0, self.padded_in - self.in_features))
        dtype = linear.weight.dtype
        q, scales, zeros = quantize_int4(weight, group_size, dtype)
        # The CPU packer ignores the tile argument (it packs two codes per byte, row-major): (N, K / 2) uint8.
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (K / group, N, 2): scale and zero of each group, the layout the kernel reads.
        pairs = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", pairs.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.unpackable = int4_unpackable(self.out_features, self.padded_in)

    @classmethod
    def concatenated(cls, parts: list[Int4WeightOnlyLinear]) -> Int4WeightOnlyLinear:
        """One module whose output is the parts' outputs side by side. The packer keeps each block of 64 output rows
        together (:func:`unpack_int4`), so packed rows stack when every part's row count is a multiple of 64
        (:func:`tiermem.weights.fuse.fuse_linears` checks the result against the parts). No biases."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        first = parts[0]
        fused.in_features, fused.padded_in, fused.group_size = first.in_features, first.padded_in, first.group_size
        fused.out_features = sum(p.out_features for p in parts)
        fused.register_buffer("weight", torch.cat([p.weight for p in parts]))
        fused.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1))
        fused.register_buffer("bias", None)
        fused.unpackable = int4_unpackable(fused.out_features, fused.padded_in)
        return fused

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (N, padded K) in ``dtype``, as the kernel reads it: ``(q - 8) * scale + zero`` per group,
        computed in float32."""
        n, k, g = self.out_features, self.padded_in, self.group_size
        codes = unpack_int4(self.weight, n, k).view(n, k // g, g).to(torch.float32)
        pairs = self.scales_and_zeros.to(torch.float32).transpose(0, 1)  # (N, K / group, 2), a strided view
        scales = pairs[..., :1].contiguous()  # contiguous: broadcasting a strided view runs 8x slower (measured)
        offsets = (pairs[..., 1:] - 8 * pairs[..., :1]).contiguous()  # zero - 8 * scale
        return torch.addcmul(offsets, codes, scales).view(n, k).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., K) -> (..., N)."""
        flat = x.reshape(-1, self.in_features)
        if self.padded_in != self.in_features:
            flat = F.pad(flat, (0, self.padded_in - self.in_features))
        if self.unpackable and flat.shape[0] >= DEQUANTIZE_ROWS and x.dtype == torch.bfloat16:
            # A prefill chunk: widening the weight for a bf16 GEMM is 1.7x faster than the kernel at 512 rows.
            out = F.linear(flat, self.dequantized(x.dtype)).view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        pairs = self.scales_and_zeros
        if pairs.dtype != x.dtype:
            pairs = pairs.to(x.dtype)
        if not pairs.is_contiguous():  # a fused part's view (tiermem.weights.fuse): the kernel misreads strides
            pairs = pairs.contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, pairs)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_weights` did: the format, how many Linear modules it swapped (``int4_modules`` of them
    to int4), and their weight bytes before and after (scales and zero points included)."""

    mode: str
    group_size: int | None
    modules: int
    bytes_before: int
    bytes_after: int
    int4_modules: int = 0

    @property
    def label(self) -> str:
        """``none``, ``int8``, ``int4-g32`` (the LM head in int8, as always) or, for a mix, ``int4-g32+int8``."""
        if self.int4_modules == 0:
            return "int8" if self.modules else "none"
        mixed = self.int4_modules < self.modules - 1  # the head is int8 under int4 too
        return f"int4-g{self.group_size}" + ("+int8" if mixed else "")


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def check_weight_quant(mode: str, group_size: int) -> None:
    """One-line errors for a bad ``--weights-quant`` or group size."""
    if mode not in WEIGHT_QUANTS:
        raise TiermemError(f"unknown weight quantization '{mode}': use one of {', '.join(WEIGHT_QUANTS)}")
    if mode in ("int4", "auto") and group_size not in INT4_GROUP_SIZES:
        sizes = ", ".join(map(str, INT4_GROUP_SIZES))
        raise TiermemError(f"int4 group size must be one of {sizes}, got {group_size}")


def _module_mode(mode: str, qualified: str, per_module: dict[str, str]) -> str:
    """int4 or int8 for one Linear: ``mode`` itself, or under ``auto`` its entry in ``per_module`` (keys are paths
    under ``layers.``, e.g. ``3.mlp.down_proj``), int8 when it has none."""
    if mode != "auto":
        return mode
    _, found, rest = qualified.rpartition("layers.")
    return per_module.get(rest, "int8") if found else "int8"


def quantize_weights(
    model: nn.Module, mode: str, group_size: int = DEFAULT_INT4_GROUP, per_module: dict[str, str] | None = None
) -> QuantReport:
    """Replace every ``nn.Linear`` in ``model`` by its ``mode`` quantized form, in place (``none``: nothing).

    ``auto`` takes each decoder Linear's mode from ``per_module`` (:func:`tiermem.formats.weight_modes`: int4 where
    the checkpoint stores 4 bits) and int8 for the rest. The LM head is int8 in every mode.
    """
    check_weight_quant(mode, group_size)
    if mode == "none":
        return QuantReport("none", None, 0, 0, 0)
    if any(p.dtype not in (torch.float32, torch.bfloat16) for p in model.parameters()):
        raise TiermemError(f"--weights-quant {mode} needs --dtype float32 or bfloat16 (the kernels' activations)")
    before = after = count = int4 = 0
    get_head = getattr(model, "get_output_embeddings", None)  # an HF model's LM head; None for other modules
    head = get_head() if callable(get_head) else None
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            qualified = f"{parent_name}.{name}" if parent_name else name
            swapped: nn.Module
            if child is head or _module_mode(mode, qualified, per_module or {}) == "int8":
                swapped = Int8WeightOnlyLinear(child)
            else:
                swapped = Int4WeightOnlyLinear(child, group_size)
                int4 += 1
            before += _tensor_bytes(child)
            after += _tensor_bytes(swapped)
            count += 1
            setattr(parent, name, swapped)
    return QuantReport(mode, group_size if int4 else None, count, before, after, int4)
