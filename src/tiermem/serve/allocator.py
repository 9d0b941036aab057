"""Give freed session memory back to the operating system.

glibc's ``malloc`` serves large blocks with ``mmap`` and returns them with ``munmap`` when freed, but each time such
a block is freed it raises its mmap threshold (up to 32 MiB on 64-bit), so later blocks of that size come from the
heap, where freed memory stays in the process. A server that spills sessions to disk frees many KV buffers of a few
MiB each and allocates new ones for the next turns: with the moving threshold that memory is kept, and the
process's RSS stays well above what its sessions hold (measured by ``benchmarks/serve_memory.py``; BENCHMARKS.md).
Setting ``M_MMAP_THRESHOLD`` once fixes the threshold (and turns its adjustment off), as ``MALLOC_MMAP_THRESHOLD_``
in the environment would. Other C libraries: nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc's malloc.h)
THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


def fix_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where there is no glibc ``mallopt``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
