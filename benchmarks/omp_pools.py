"""One int4 GEMV of SmolLM2's gate/up shape, timed from the thread that owns the process's only OpenMP pool and from
a second thread while the first thread's pool is alive (the case of a server whose main thread loaded the model).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/omp_pools.py

libgomp gives every thread that starts parallel work its own pool; with more pooled threads than cores it shortens
their spin-waits, so each small parallel region pays a wake-up. ``tiermem serve`` loads its model off the main
thread for this reason (``tiermem.serve.cli.off_main_thread``).
"""

from __future__ import annotations

import sys
import threading
import time

import torch


def gemv_us(rounds: int = 2000) -> float:
    """Mean microseconds of one (1, 576) x (1536, 576) int4 GEMV, bf16 activations, group 32."""
    codes = torch.randint(-8, 8, (1536, 576), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    pairs = torch.randn(576 // 32, 1536, 2).bfloat16()
    x = torch.randn(1, 576).bfloat16()
    for _ in range(200):
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, pairs)
    start = time.perf_counter()
    for _ in range(rounds):
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, pairs)
    return (time.perf_counter() - start) / rounds * 1e6


def on_thread() -> float:
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(gemv_us()))
    thread.start()
    thread.join()
    return result[0]


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    alone = on_thread()  # the main thread has run no parallel work yet: this thread's pool is the only one
    main_thread = gemv_us()  # now the main thread owns a pool too
    second = on_thread()
    print(f"a thread's pool, the only one: {alone:.1f} us; the main thread's pool: {main_thread:.1f} us; ", end="")
    print(f"a thread's pool beside the main thread's: {second:.1f} us ({second / main_thread:.1f}x)")


if __name__ == "__main__":
    main()
