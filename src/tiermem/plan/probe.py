"""A short probe of the machine's roofline: what the planner's cost model divides by.

Measured, not read from spec sheets (FlexGen fits its constants to real runs for the same reason):
- ``gemm_flops``: fp32 matrix multiply rate at prefill-like shapes (FLOP/s);
- ``gemv_bytes``: the rate a matrix-vector product streams weights from RAM (bytes/s): decode is bound by it;
- ``load_bytes``: how fast a cached layer file is read into a preallocated buffer (streaming's default loader);
- ``disk_bytes``: a cold sequential read (the file dropped from the page cache first);
- ``layer_overhead_s``: the fixed cost of one decoder layer's forward at one token through tiermem's attention
  path (Python, dispatch, small ops), measured on a tiny model: at 135M parameters it outweighs the arithmetic;
- ``base_rss``: the process's resident memory before any model (Python, torch, transformers).

Results are cached per machine (CPU model, threads) under the tiermem cache; ``force=True`` measures again.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tiermem.stats import current_rss_bytes


@dataclass(frozen=True)
class Machine:
    """Measured rates (per second) and fixed costs of this machine; see the module docstring."""

    gemm_flops: float
    gemv_bytes: float
    load_bytes: float
    disk_bytes: float
    layer_overhead_s: float
    base_rss: int
    threads: int
    cpu: str


def _best_of(runs: int, fn: object) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gemm_flops() -> float:
    a, b = torch.randn(512, 2048), torch.randn(2048, 2048)
    seconds = _best_of(5, lambda: a @ b)
    return 2 * 512 * 2048 * 2048 / seconds


def _gemv_bytes() -> float:
    w, x = torch.randn(8192, 4096), torch.randn(4096)  # 128 MiB: far past the caches
    seconds = _best_of(5, lambda: w @ x)
    return w.numel() * 4 / seconds


def _file_rates(folder: Path, size: int = 256 * 2**20) -> tuple[float, float]:
    """(page-cache read rate, cold sequential read rate) in bytes/s, on a temporary file in ``folder``.

    The first is what streaming's ``read`` loader gets from a cached layer file: one ``readinto`` into a buffer
    allocated once."""
    buffer = torch.empty(size, dtype=torch.uint8)
    target = memoryview(buffer.numpy())  # type: ignore[arg-type]
    with tempfile.NamedTemporaryFile(dir=folder, prefix="tiermem-probe-") as handle:
        handle.write(os.urandom(2**20) * (size // 2**20))
        handle.flush()
        os.fsync(handle.fileno())

        def read_all() -> None:
            with open(handle.name, "rb", buffering=0) as cached:
                done = 0
                while done < size:
                    done += cached.readinto(target[done:]) or size

        read_all()  # the first pass brings the file into the page cache and commits the buffer's pages
        load = size / _best_of(3, read_all)
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        read_all()
        disk = size / (time.perf_counter() - start)
    return load, disk


def _layer_overhead() -> float:
    """Seconds per decoder layer per one-token forward on a tiny model (arithmetic negligible): the difference
    between 8 and 2 layers, timed the way :mod:`tiermem.plan.layer_profile` times a model's own layers."""
    from transformers import LlamaConfig

    from tiermem.plan.layer_profile import time_model

    tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    two, eight = (time_model(tiny, layers, "full", context=8, chunk=8)[0] for layers in (2, 8))
    return max((eight - two) / 6, 0.0)


def _fingerprint() -> str:
    return f"{platform.processor() or platform.machine()}-{os.cpu_count()}-{torch.get_num_threads()}-{_cpu_name()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def probe(
    cache_file: Path | None = None, folder: Path | None = None, force: bool = False, file_size: int = 256 * 2**20
) -> Machine:
    """Measure the machine (a few seconds), or return the cached measurement for this CPU and thread count."""
    if cache_file is not None and cache_file.is_file() and not force:
        saved = json.loads(cache_file.read_text())
        if saved.get("fingerprint") == _fingerprint():
            return Machine(**saved["machine"])
    base_rss = current_rss_bytes()
    load, disk = _file_rates(folder or Path(tempfile.gettempdir()), file_size)
    machine = Machine(
        gemm_flops=_gemm_flops(),
        gemv_bytes=_gemv_bytes(),
        load_bytes=load,
        disk_bytes=disk,
        layer_overhead_s=_layer_overhead(),
        base_rss=base_rss,
        threads=torch.get_num_threads(),
        cpu=_cpu_name(),
    )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"fingerprint": _fingerprint(), "machine": asdict(machine)}, indent=1))
    return machine
