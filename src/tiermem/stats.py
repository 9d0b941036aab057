"""Memory and time accounting for one generation."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux ``VmHWM``).

    Writing ``5`` to ``/proc/self/clear_refs`` resets the peak, so a run can report its own peak instead of the peak
    of everything the process did before it (model loading, GGUF dequantization). Returns False where unsupported.
    """
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size in bytes since the last :func:`reset_peak_rss` (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: getrusage gives the lifetime peak, in KiB on Linux and bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


@dataclass
class Stats:
    """What one generation cost. Times in seconds, memory in bytes; ``policy`` is the policy's complete repr."""

    policy: str
    prompt_tokens: int = 0
    context_tokens: int = 0
    question_tokens: int = 0
    new_tokens: int = 0
    kv_tokens: int = 0  # tokens held by the largest layer cache once the prompt is in (after any compression)
    kv_bytes_peak: int = 0  # peak bytes allocated for K and V over all layers, prefill included
    kv_bytes_decode: int = 0  # bytes allocated for K and V at the end of generation
    peak_rss_bytes: int = 0  # process high-water mark during this generation (model weights included)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # forwards after the prefill; the first new token comes from the prefill's logits
    extra: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["decode_tokens_per_second"] = self.decode_tokens_per_second
        out["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        return out


class Stopwatch:
    """Accumulates wall time over ``with`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start
