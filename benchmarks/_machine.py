"""Measuring on a shared machine: peak RSS, CPU load from other processes, thread settings, the code's state.

Shared by the speed benchmarks (stdlib only: the llama.cpp worker imports it from a venv without torch)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_LOAD = os.getloadavg()[0]  # the 1-minute load average when the run began: > ~1 means shared cores


def machine_note() -> str:
    """How busy the machine was: the load average at the start and now (speed figures need both near 0)."""
    return f"load average {START_LOAD:.1f} at the start, {os.getloadavg()[0]:.1f} at this row"


def free_port() -> int:
    """A free TCP port on the loopback, for a server a benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM (Linux): the peak read after the measured run then covers that run only (weights included)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over ``seconds``: other work on the machine skews every number."""
    sample = cpu_jiffies
    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` seconds) until the CPUs are nearly idle; return the last busy fraction seen."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        print(f"  CPUs {busy:.0%} busy with other work; waiting...", flush=True)
        time.sleep(20)
        busy = cpu_busy_fraction()
    return busy


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    return env


def tree_state() -> str:
    """HEAD plus a hash of uncommitted changes under src/: the tiermem code these numbers belong to."""
    import hashlib

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    dirty = git("diff", "HEAD", "--", "src") + git("ls-files", "--others", "--exclude-standard", "src")
    return (
        head
        if not dirty
        else f"{head} + uncommitted src changes (sha256 {hashlib.sha256(dirty.encode()).hexdigest()[:12]})"
    )
