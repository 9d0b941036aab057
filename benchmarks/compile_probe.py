"""Does ``torch.compile`` shorten a decode step's non-attention half on this CPU? (issue 11 item 3, a probe)

One SmolLM2-135M layer's work after attention at one token, in the default formats (bf16 activations, int4 weights
in groups of 32 on PyTorch's CPU kernel): o_proj, residual add, RMSNorm, the fused gate/up projection, SiLU x up,
down_proj, residual add. Timed eagerly and compiled by inductor (``dynamic=False``, weights passed as arguments so
that one graph serves every layer), each the mean of ``--calls`` calls after 30 warm-up calls, twice in turn:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compile_probe.py --threads 2

Random int4 codes and scales stand in for the weights (the kernel's time does not depend on their values).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

D, INTER, GROUP = 576, 1536, 32  # SmolLM2-135M: hidden size, FFN width; the int4 group of the default formats


def packed(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int4 weights (n, k) packed for the CPU kernel, and their bf16 scales and zeros (k / GROUP, n, 2)."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), torch.randn(k // GROUP, n, 2).bfloat16() / 100


def after_attention(h: torch.Tensor, attn: torch.Tensor, *w: torch.Tensor) -> torch.Tensor:
    """``h`` (1, 1, D) residual stream, ``attn`` (1, 1, Hq, 64) attention output -> the layer's output (1, 1, D)."""
    wo, so, norm, wgu, sgu, wd, sd = w
    h = h + torch.ops.aten._weight_int4pack_mm_for_cpu(attn.reshape(1, D), wo, GROUP, so).view(1, 1, D)
    x = F.rms_norm(h, [D], norm, 1e-5)
    gate_up = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(1, D), wgu, GROUP, sgu).view(1, 1, 2 * INTER)
    gate, up = gate_up.split([INTER, INTER], -1)
    down = torch.ops.aten._weight_int4pack_mm_for_cpu((F.silu(gate) * up).reshape(1, INTER), wd, GROUP, sd)
    return h + down.view(1, 1, D)


def micros(fn: Callable[[], torch.Tensor], calls: int) -> float:
    for _ in range(30):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = (*packed(D, D), torch.randn(D).bfloat16(), *packed(2 * INTER, D), *packed(D, INTER))
    inputs = (torch.randn(1, 1, D).bfloat16(), torch.randn(1, 1, 9, 64).bfloat16(), *weights)
    with torch.inference_mode():
        compiled = torch.compile(after_attention, dynamic=False)
        start = time.perf_counter()
        compiled(*inputs)
        print(f"compile: {time.perf_counter() - start:.1f} s")
        for _ in range(2):
            print(f"eager    {micros(lambda: after_attention(*inputs), args.calls):7.1f} us per layer")
            print(f"compiled {micros(lambda: compiled(*inputs), args.calls):7.1f} us per layer")
        diff = (compiled(*inputs) - after_attention(*inputs)).abs().max().item()
        print(f"max |compiled - eager|: {diff:.3g} (bf16 outputs)")


if __name__ == "__main__":
    main()
