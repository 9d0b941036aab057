"""RMSNorm in one kernel for bfloat16 models (a model transformation, applied by the loader in bf16 runs).

transformers' Llama-family RMSNorm runs eight operations per call (to float32, pow, mean, add, rsqrt, mul, back to
the input dtype, times the weight), twice per layer; a decode step's cost is largely per operation (BENCHMARKS.md).
``torch.rms_norm`` is one call but, on CPU in torch 2.13, the same ten operations inside. LayerNorm has a native
CPU kernel, and RMSNorm is LayerNorm of a row whose mean is zero: for ``z = [x, -x]`` (2D values) the mean is 0 and
the variance is ``mean(x^2)``, so ``layer_norm(z, weight=[w, w])[:D] = x / sqrt(mean(x^2) + eps) * w``. Four
operations (the weight and the row each doubled by a concatenation, one layer_norm) and a view; on probes it equals
``torch.rms_norm`` bit for bit (tests/test_norms.py), in about half the time alone (11 against 21-29 us, one row of
576) and 3-8% of a 512-token decode step (BENCHMARKS.md, "Fewer operations per decode step, and an fp16 LM head
tried and dropped").

Departure from transformers, bf16 only: it rounds once (the normalised value times the weight, computed in float32),
where transformers rounds the normalised value to bf16 and then rounds its product with the weight again. On a
probe of SmolLM2's width the one-rounding result is closer to a float64 reference (mean abs error 1.09e-3 against
1.47e-3), so this is a small accuracy gain, not a loss; outputs are not bit-identical to transformers'. Float32
models keep transformers' forward (``--formats exact`` stays exact). Gemma3's norm, ``(1 + weight)`` in float32, is
left alone.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# transformers' RMSNorm classes whose forward is ``weight * normalize(x.float()).to(x.dtype)``
PLAIN_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
PROBE_TOLERANCE = 2**-6  # relative to the output's scale: two bf16 roundings apart at most, with margin


def _one_call(module: Any, width: tuple[int], x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., D) -> (..., D): RMSNorm as one LayerNorm kernel over ``[x, -x]`` (module docstring). The weight
    is read at each call (a streamed or tuned layer may replace it in place, which no version counter reports)."""
    d = width[0]
    weight = module.weight
    doubled = torch.cat((weight, weight))
    both = F.layer_norm(torch.cat((x, -x), dim=-1), (2 * d,), doubled, None, module.variance_epsilon)
    return both[..., :d].contiguous()  # a copy only for several rows (one row's half is already dense)


def _agrees(module: Any, width: tuple[int], dtype: torch.dtype) -> bool:
    """Whether the one-call form matches the module's own forward on a probe (guards a changed forward)."""
    x = (torch.randn(4, width[0], generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    with torch.no_grad():
        theirs, ours = type(module).forward(module, x).float(), _one_call(module, width, x).float()
    return bool(((theirs - ours).abs().max() <= PROBE_TOLERANCE * theirs.abs().max()).item())


def fuse_norms(model: nn.Module) -> int:
    """Give every plain RMSNorm of a bfloat16 ``model`` the one-call forward; returns how many. Nothing for other
    dtypes or norm kinds, weights not loaded yet (streamed layers), or when a norm's probe disagrees."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in PLAIN_RMSNORMS or "forward" in vars(module):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.bfloat16 or weight.dim() != 1:
            continue
        if weight.is_meta:  # a streamed layer's norm: its weight arrives with the layer, so it cannot be probed
            continue
        width = (int(weight.shape[0]),)
        if not _agrees(module, width, torch.bfloat16):
            continue
        module.forward = partial(_one_call, module, width)
        count += 1
    return count
