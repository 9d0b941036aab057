"""Attention of one decode step over S cached keys, per layer, in each KV format and kernel path.

SmolLM2-135M's shapes (9 query heads, 3 KV heads, head dim 64), the rows held in a KV buffer block with some spare
capacity as a real cache holds them. Each path is timed on the same rows and compared with float64 attention over
the rows as stored (so the error is the kernel's, not the storage format's):

- ``int8 -> f32``: :func:`int8_attention` converting K and V to float32 (before this change, still used below
  ``HALF_DECODE_MIN_KEYS`` keys);
- ``int8 -> bf16``: the same converting to bfloat16 (a bf16 model's path from ``HALF_DECODE_MIN_KEYS`` keys on);
- ``bf16 block``: bfloat16 rows, eager attention reading the buffer's whole block (:meth:`KVBuffer.decode_keys`);
- ``bf16 prefix``: the same over the used prefix of the block (a batched matmul copies a non-dense prefix);
- ``bf16 SDPA``: ``F.scaled_dot_product_attention`` on the prefix (the path before this change);
- ``f32``: float32 rows (``--formats exact``), which keep SDPA at one query (as fast as the eager path there).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_attention.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import tiermem.kvstore.quant_attention as qa
from tiermem.kvstore.dense import KVBuffer
from tiermem.layer_info import LayerInfo
from tiermem.memory.layer import attention, buffer_attention

HQ, HKV, D = 9, 3, 64


def timed(fn: Callable[[], torch.Tensor], seconds: float) -> tuple[float, torch.Tensor]:
    """Median microseconds per call over about ``seconds`` of calls, and the last result."""
    out = fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6, out


def exact(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Float64 attention (1, Hq, 1, D) of ``q`` over float ``keys``/``values`` (1, Hkv, S, D)."""
    k, v = (x.double().repeat_interleave(HQ // HKV, dim=1) for x in (keys, values))
    return ((q.double() @ k.transpose(-1, -2)) * D**-0.5).softmax(dim=-1) @ v


def paths(s: int, seconds: float) -> dict[str, tuple[float, float]]:
    """{path: (microseconds, max |error| / max |exact|)} for one decode step over ``s`` keys."""
    gen = torch.Generator().manual_seed(s)
    info = LayerInfo(0, HQ, HKV, D, D**-0.5, None, None, None, 1 << 20, torch.bfloat16)  # type: ignore[arg-type]
    keys = torch.randn(1, HKV, s, D, generator=gen) * 2
    values = torch.randn(1, HKV, s, D, generator=gen)
    q = (torch.randn(1, HQ, 1, D, generator=gen) * 2).bfloat16()
    q_pos, spare = torch.tensor([s - 1]), s // 8  # a planned block: some room for the tokens still to come
    buffers = {}
    for name, dtype in (("int8", torch.bfloat16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        buf = KVBuffer(HKV, D, dtype, kv_format=name)
        buf.reserve(s + spare)
        buf.append(keys, values, torch.arange(s))
        buffers[name] = buf
    int8, bf16, f32 = buffers["int8"], buffers["bfloat16"], buffers["float32"]

    def int8_path(threshold: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            qa.HALF_DECODE_MIN_KEYS = threshold
            return buffer_attention(q, int8, q_pos, info)

        return run

    def sdpa(buf: KVBuffer, query: torch.Tensor) -> Callable[[], torch.Tensor]:
        k, v, _ = buf.stored()
        return lambda: F.scaled_dot_product_attention(query, k, v, scale=D**-0.5, enable_gqa=True)

    def prefix(buf: KVBuffer, query: torch.Tensor) -> Callable[[], torch.Tensor]:
        k, v, pos = buf.stored()
        return lambda: attention(query, k, v, q_pos, pos[0], info)

    runs = {
        "int8 -> f32": int8_path(1 << 30),
        "int8 -> bf16": int8_path(0),
        "bf16 block": lambda: buffer_attention(q, bf16, q_pos, info),
        "bf16 prefix": prefix(bf16, q),
        "bf16 SDPA": sdpa(bf16, q),
        "f32": lambda: buffer_attention(q.float(), f32, q_pos, info),
    }
    references = {
        name: exact(q, *(buf.format.decode(r, torch.float64) for r in buf.stored()[:2]))
        for name, buf in buffers.items()
    }
    rows = {}
    default_threshold = qa.HALF_DECODE_MIN_KEYS
    for name, run in runs.items():
        micros, out = timed(run, seconds)
        ref = references["int8" if name.startswith("int8") else "bfloat16" if "bf16" in name else "float32"]
        rows[name] = (micros, ((out.double() - ref).abs().max() / ref.abs().max()).item())
    qa.HALF_DECODE_MIN_KEYS = default_threshold
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per path and length")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = {int(s): paths(int(s), args.seconds) for s in args.lengths.split(",")}
    names = list(next(iter(table.values())))
    print(f"us per layer per decode step (median), {args.threads} thread(s); relative max error vs float64\n")
    print("| keys | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for s, rows in table.items():
        cells = [f"{rows[n][0]:.0f} ({rows[n][1]:.0e})" for n in names]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
