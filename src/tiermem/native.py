"""tiermem's one compiled part, the fused decode step (``csrc/decode_step.cpp``), built on first use.

Built with PyTorch's own extension builder (``torch.utils.cpp_extension.load``: the compiler the machine has, ninja,
PyTorch's headers) into the tiermem cache, once per source, torch version and CPU (``-march=native``: the build
directory is named after the CPU's instruction-set flags, so a cache shared with another machine never runs code
built for it). Where no compiler is found or the build fails, :func:`decode_extension` returns None with the reason
and tiermem runs its Python decode step (the same results within bf16 rounding, slower).
"""

from __future__ import annotations

import hashlib
import os
import platform
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from tiermem.models import cache_root

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "decode_step.cpp"  # includes kernels.h from the same folder
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (Linux), or the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine()


def build_name() -> str:
    """The module's name: changes with the source, the flags, torch's version and the CPU."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):  # the source and the header it includes
        digest.update(path.name.encode() + path.read_bytes())
    for part in (" ".join(FLAGS), torch.__version__, _cpu_flags()):
        digest.update(part.encode())
    return f"tiermem_decode_{digest.hexdigest()[:12]}"


@cache
def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("TIERMEM_NATIVE", "1") == "0":
        return None, "TIERMEM_NATIVE=0"
    try:
        from torch.utils import cpp_extension

        name = build_name()
        folder = cache_root() / "native" / name
        folder.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as error:  # a missing compiler or ninja, a failed build: the Python step runs instead
        first = str(error).strip().splitlines()
        return None, f"the fused decode step did not build ({first[0] if first else type(error).__name__})"
    return module, ""


def decode_extension() -> tuple[ModuleType | None, str]:
    """The compiled module (building it the first time in this cache, ~1 minute), or None and why not."""
    return _load()
