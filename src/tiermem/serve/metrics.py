"""Counters for ``/metrics`` in the Prometheus text format (no client library: a handful of series)."""

from __future__ import annotations

import threading
from collections import Counter

from tiermem.serve.sessions import StoreStats

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests by endpoint and status, tokens, time to first token; thread-safe (the worker writes too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.decode_steps = 0
        self.decode_rows = 0

    def decode_step(self, rows: int) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def turn(self, prompt: int, cached: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_buckets[i] += 1

    def render(self, store: StoreStats, queue_depth: int) -> str:
        with self._lock:
            lines = [
                "# HELP tiermem_requests_total HTTP requests by endpoint and status.",
                "# TYPE tiermem_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'tiermem_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for name, value, text in (
                ("prompt_tokens", self.prompt_tokens, "Prompt tokens of completed turns."),
                ("cached_tokens", self.cached_tokens, "Prompt tokens a stored session already held."),
                ("completion_tokens", self.completion_tokens, "Generated tokens."),
                ("decode_steps", self.decode_steps, "Batched decode forwards."),
                ("decode_rows", self.decode_rows, "Tokens decoded by those forwards (rows / steps = batch size)."),
                ("sessions_dropped", store.dropped, "Sessions dropped because RAM and disk were full."),
                ("sessions_spilled", store.spilled, "Sessions moved from RAM to disk."),
                ("sessions_restored", store.restored, "Sessions read back from disk."),
                ("sessions_corrupt", store.corrupt, "Session files that failed their checksum and were set aside."),
            ):
                lines += [f"# HELP tiermem_{name}_total {text}", f"# TYPE tiermem_{name}_total counter"]
                lines.append(f"tiermem_{name}_total {value}")
            lines += [
                "# HELP tiermem_ttft_seconds Time from request to first token.",
                "# TYPE tiermem_ttft_seconds histogram",
            ]
            for bound, n in zip(TTFT_BUCKETS, self.ttft_buckets, strict=True):
                lines.append(f'tiermem_ttft_seconds_bucket{{le="{bound}"}} {n}')
            lines.append(f'tiermem_ttft_seconds_bucket{{le="+Inf"}} {self.ttft_count}')
            lines += [f"tiermem_ttft_seconds_sum {self.ttft_sum:.6f}", f"tiermem_ttft_seconds_count {self.ttft_count}"]
        lines += ["# HELP tiermem_sessions Sessions by tier.", "# TYPE tiermem_sessions gauge"]
        lines += [f'tiermem_sessions{{tier="{tier}"}} {n}' for tier, n in sorted(store.sessions.items())]
        lines += ["# HELP tiermem_kv_bytes Session KV bytes by tier.", "# TYPE tiermem_kv_bytes gauge"]
        lines += [f'tiermem_kv_bytes{{tier="{tier}"}} {n}' for tier, n in sorted(store.bytes.items())]
        lines += ["# HELP tiermem_queue_depth Turns queued or running.", "# TYPE tiermem_queue_depth gauge"]
        lines.append(f"tiermem_queue_depth {queue_depth}")
        return "\n".join(lines) + "\n"
