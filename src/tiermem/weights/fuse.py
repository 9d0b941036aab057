"""Fused projections: q/k/v as one quantized Linear, gate/up as another (gpt-fast's ``wqkv`` and llama.cpp's
stacked ``ffn_gate_up``), a model transformation applied once after quantization.

A decode step spends much of its time in per-call cost, and one GEMV over the stacked rows of several matrices
costs less than one per matrix on the same input (measured at 2 threads, bf16 activations, int4 g32, SmolLM2's
shapes: q/k/v 58 -> 35 us, gate/up 84 -> 71 us per layer). The parts stay on the model as views of the fused
storage (no extra memory), so code that reads or hooks ``q_proj`` keeps working: the fused path is taken only while
the parts are the very modules that were fused, still view the fused storage and carry no hooks (retrieval-head
calibration hooks ``q_proj``; LoRA replaces it; ``model.to`` would re-allocate it).

Fusion is checked, not assumed: the fused module's output must equal the parts' outputs bit for bit on a probe at
one row (the decode kernel) and at a prefill chunk's rows (the widened-weight GEMM); otherwise the parts stay apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, TypeGuard

import torch
from torch import nn

from tiermem.weights.quant import BLOCK_N, DEQUANTIZE_ROWS, Int4WeightOnlyLinear, Int8WeightOnlyLinear

QKV = "_tiermem_qkv"  # attribute of an attention module: its Fused q/k/v (kept out of the module tree)
GATE_UP = "_tiermem_gate_up"  # attribute of an MLP: its Fused gate/up
QuantLinear: TypeAlias = Int8WeightOnlyLinear | Int4WeightOnlyLinear


@dataclass(frozen=True)
class Fused:
    """A fused Linear and the parts it replaces: ``module(x)`` (..., K) -> (..., sum(sizes)), ``sizes`` the parts'
    output widths in order, ``pointers`` the data pointers of the parts' weights (views of the fused storage)."""

    module: QuantLinear
    parts: tuple[QuantLinear, ...]
    sizes: tuple[int, ...]
    pointers: tuple[int, ...]

    def usable(self, *current: Any) -> bool:
        """Whether ``current`` (the model's modules now) are still the fused parts, unchanged and unhooked."""
        for part, now, pointer in zip(self.parts, current, self.pointers, strict=True):
            if part is not now or now._forward_hooks or now._forward_pre_hooks:
                return False
            weight = now._buffers.get("weight")  # the buffer dict, not Module.__getattr__ (this runs every step)
            if weight is None or weight.data_ptr() != pointer:  # replaced, or re-registered as a Parameter
                return False
        return True

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts' outputs for ``x`` (..., K), as views of one fused output."""
        return self.module(x).split(self.sizes, dim=-1)


def _fusable(parts: list[nn.Module]) -> TypeGuard[list[QuantLinear]]:
    kind = type(parts[0])
    if kind not in (Int8WeightOnlyLinear, Int4WeightOnlyLinear) or any(type(p) is not kind for p in parts):
        return False
    if any(p.bias is not None or p.in_features != parts[0].in_features for p in parts):
        return False
    if kind is Int4WeightOnlyLinear:  # packed rows stack in whole blocks only
        return all(p.group_size == parts[0].group_size and p.out_features % BLOCK_N == 0 for p in parts)
    return True


def _same_outputs(fused: QuantLinear, parts: list[QuantLinear], dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    for rows in (1, DEQUANTIZE_ROWS):
        x = torch.randn(rows, parts[0].in_features, generator=generator).to(dtype)
        if not torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1)):
            return False
    return True


def fuse_linears(parts: list[nn.Module], dtype: torch.dtype) -> Fused | None:
    """Stack quantized Linears that read the same input into one; the parts' weights become views of it.

    None (and nothing changed) when they cannot be fused: mixed formats or int4 groups, biases, int4 parts whose rows
    are not whole 64-row blocks, or a fused output that differs from the parts' on the probe in ``dtype``.
    """
    if not _fusable(parts):
        return None
    fused: QuantLinear = type(parts[0]).concatenated(parts)
    if not _same_outputs(fused, parts, dtype):
        return None
    start = 0
    for part in parts:  # buffers reassigned: the parts' own storage is released
        end = start + part.out_features
        part.weight = fused.weight[start:end]
        if isinstance(part, Int4WeightOnlyLinear):
            part.scales_and_zeros = fused.scales_and_zeros[:, start:end]  # strided: its forward copies it
        else:
            part.scales = fused.scales[start:end]
        start = end
    sizes = tuple(p.out_features for p in parts)
    return Fused(fused, tuple(parts), sizes, tuple(p.weight.data_ptr() for p in parts))


def _fused_mlp_forward(mlp: Any, fused: Fused, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP (Llama, Qwen, Mistral, Gemma3): ``down(act(gate(x)) * up(x))`` with gate and up in one call."""
    if not fused.usable(mlp.gate_proj, mlp.up_proj):
        return type(mlp).forward(mlp, x)
    gate, up = fused.split(x)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def fuse_projections(model: nn.Module, dtype: torch.dtype) -> int:
    """Fuse every decoder layer's q/k/v and gate/up quantized Linears in place; returns how many groups fused.

    The attention side is read by :func:`tiermem.attention._project` (``QKV``); a fused MLP gets its own forward.
    """
    count = 0
    for module in model.modules():
        names = ("q_proj", "k_proj", "v_proj") if hasattr(module, "q_proj") else ("gate_proj", "up_proj")
        if not all(isinstance(getattr(module, n, None), nn.Module) for n in names):
            continue
        if names[0] == "gate_proj" and not all(hasattr(module, n) for n in ("down_proj", "act_fn")):
            continue
        fused = fuse_linears([getattr(module, n) for n in names], dtype)
        if fused is None:
            continue
        object.__setattr__(module, QKV if names[0] == "q_proj" else GATE_UP, fused)  # not a submodule: no state_dict
        if names[0] == "gate_proj":
            module.forward = partial(_fused_mlp_forward, module, fused)
        count += 1
    return count


def fused_qkv(module: Any) -> Fused | None:
    """The attention module's usable fused q/k/v, if any."""
    fused = module.__dict__.get(QKV)
    if fused is not None and fused.usable(module.q_proj, module.k_proj, module.v_proj):
        return fused
    return None
