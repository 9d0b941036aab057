"""Helpers of ``benchmarks/serve_fault.py``: a ``tiermem serve`` subprocess, a client-side model of the session
store (what ``cached_tokens`` each request must report) and checks of a sessions folder after a run.

:class:`StoreModel` mirrors the matching rules of :mod:`tiermem.serve.sessions` (longest common token prefix among
the owner's sessions, ties to the most recent; continue, truncate in place, fork a copy, or start anew) from what a
client sees: the ids it sent and the ids it got back. A request whose reported ``cached_tokens`` differs from the
model's is a session served from the wrong state (another owner's, a stale file, a lost turn) or a model bug; either
way it is counted and shown.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tiermem.errors import TiermemError
from tiermem.serve.rewind import common_prefix
from tiermem.serve.sessions import MIN_FORK_TOKENS, SUFFIX, SessionStore
from tiermem.serve.state import StateError, read_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``tiermem serve`` as a subprocess on 127.0.0.1 (a new free port at each start) over one sessions folder;
    its stderr is appended to ``log`` so tracebacks can be counted after the run."""

    def __init__(self, model: str, folder: Path, options: list[str], keys: list[str], log: Path):
        self.model, self.folder, self.options, self.keys, self.log = model, folder, options, keys, log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = self.pending = ""
        self.counters: dict[str, int] = {}  # metrics summed over the runs that were scraped before they ended
        self.starts = 0

    def start(self, timeout: float = 600) -> None:
        self.launch()
        self.wait(timeout)

    def launch(self) -> None:
        port = free_port()
        command = [sys.executable, "-m", "tiermem.cli", "serve", "--model", self.model, "--port", str(port)]
        command += ["--sessions-dir", str(self.folder), *self.options]
        for key in self.keys:
            command += ["--api-key", key]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TIERMEM_API_KEY": ""}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.pending = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float = 600) -> None:
        """Until the launched server answers ``/health`` (a loaded 2-core machine takes minutes to import torch)."""
        assert self.process is not None
        url = self.pending
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TiermemError(f"the server exited with {self.process.returncode}: see {self.log}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    self.url, self.starts = url, self.starts + 1
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.process.kill()
        raise TiermemError(f"the server did not start in {timeout:.0f} s: see {self.log}")

    def scrape(self) -> None:
        """Add this run's session counters (spilled, restored, corrupt, ...) to ``counters``."""
        headers = {"Authorization": f"Bearer {self.keys[0]}"} if self.keys else {}
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=30).text
        for name, value in re.findall(r"^tiermem_(sessions_\w+)_total (\d+)$", text, flags=re.M):
            self.counters[name] = self.counters.get(name, 0) + int(value)

    def stop(self, how: str = "term") -> None:
        """``term``: SIGTERM and wait (graceful: uvicorn drains, the store writes what is dirty); ``kill``: SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process, self.url = None, ""

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback") if self.log.exists() else 0


class _ErrorCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class ThreadServer(Server):
    """The same server built in this process and run by uvicorn in a thread (seconds to start where importing
    torch in a new process takes minutes). ``stop("kill")`` cannot kill a thread: the store's exit-time writes are
    skipped instead, so the next start finds only what was on disk during the run, as after a kill -9 between
    turns. Tracebacks are counted from ``tiermem.serve``'s error log records."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.errors = _ErrorCount()
        logging.getLogger("tiermem.serve").addHandler(self.errors)
        self.thread: threading.Thread | None = None
        self.uvicorn: Any = None
        self.crash = False

    def launch(self) -> None:
        import uvicorn

        from tiermem.cli import build_parser
        from tiermem.serve.cli import build

        server = self

        class Store(SessionStore):
            def close(self) -> None:
                if not server.crash:
                    super().close()

        argv = ["serve", "--model", self.model, "--sessions-dir", str(self.folder), *self.options]
        for key in self.keys:
            argv += ["--api-key", key]
        app = build(build_parser().parse_args(argv), session_store=Store)
        port = free_port()
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        self.pending, self.crash = f"http://127.0.0.1:{port}", False

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if self.thread is None or not self.thread.is_alive() or time.monotonic() > deadline:
                raise TiermemError("the in-process server did not start")
            time.sleep(0.02)
        self.url, self.starts = self.pending, self.starts + 1

    def stop(self, how: str = "term") -> None:
        if self.thread is None:
            return
        self.crash = how == "kill"
        self.uvicorn.should_exit = True
        self.thread.join(timeout=120)
        self.thread, self.url = None, ""

    def tracebacks(self) -> int:
        return self.errors.count


@dataclass
class ModelSession:
    owner: str
    tokens: list[int]
    prompt_len: int
    used: int
    logits: bool = True  # holds the next-token logits after ``tokens``


@dataclass
class StoreModel:
    """What the server's session store holds, as the clients can know it. ``truncatable``: the policy's caches can
    be cut back to a prefix (dense full attention); a compressed one only continues or starts anew."""

    truncatable: bool
    sessions: list[ModelSession] = field(default_factory=list)
    clock: int = 0

    def lease(self, owner: str, ids: list[int]) -> tuple[ModelSession, int]:
        """The session a request runs on (made here when new) and the ``cached_tokens`` it must report."""
        best, best_len = None, 0
        for s in self.sessions:
            if s.owner != owner:
                continue
            n = common_prefix(s.tokens, ids)
            if n > best_len or (n == best_len and n and best is not None and s.used > best.used):
                best, best_len = s, n
        self.clock += 1
        if best is not None and best_len:
            held = len(best.tokens)
            if best_len == held and (len(ids) > held or best.logits):
                best.used = self.clock
                return best, held
            cut = min(best_len, len(ids) - 1)
            if cut >= 1 and self.truncatable and (cut >= best.prompt_len - 1 or cut >= MIN_FORK_TOKENS):
                if cut < best.prompt_len - 1:  # diverged before the last answer: the server works on a copy
                    best = ModelSession(owner, list(best.tokens), best.prompt_len, 0)
                    self.sessions.append(best)
                best.tokens, best.prompt_len = best.tokens[:cut], min(best.prompt_len, cut)
                best.logits, best.used = False, self.clock
                return best, cut
        fresh = ModelSession(owner, [], 0, self.clock)
        self.sessions.append(fresh)
        return fresh, 0

    @staticmethod
    def finish(session: ModelSession, ids: list[int], out: list[int], finish: str) -> None:
        """After a completed turn: the session holds the prompt and every generated id it fed (the last one of a
        turn cut by ``max_tokens`` is sampled, never fed)."""
        session.tokens = [*ids, *(out[:-1] if finish == "length" and out else out)]
        session.prompt_len, session.logits = len(ids), True

    def forget_new(self, session: ModelSession) -> None:
        """A failed turn: a session that was new (nothing on disk) is forgotten by the server too."""
        if not session.tokens and session in self.sessions:
            self.sessions.remove(session)


def held_after(ids: list[int], out: list[int], finish: str) -> int:
    """Tokens a session holds after a turn on ``ids`` that generated ``out`` (see :meth:`StoreModel.finish`)."""
    return len(ids) + len(out) - (1 if finish == "length" and out else 0)


def check_folder(folder: Path) -> dict[str, Any]:
    """Leftovers of a crash in a sessions folder: temporary files, set-aside (corrupt) files, and session files
    that fail their checksum or do not parse."""
    files = [p for p in folder.iterdir() if p.is_file()]
    bad = []
    for path in files:
        if path.name.endswith(SUFFIX):
            try:
                read_file(path)
            except (StateError, OSError, ValueError) as exc:
                bad.append(f"{path.name}: {exc}")
    return {
        "session_files": sum(p.name.endswith(SUFFIX) for p in files),
        "tmp_files": [p.name for p in files if p.name.endswith(".tmp")],
        "corrupt_set_aside": [p.name for p in files if p.name.endswith(".corrupt")],
        "unreadable": bad,
    }


def completion_fields(response: Any) -> tuple[list[int], str, int]:
    """Generated ids, finish reason and cached tokens of a ``/v1/completions`` response (``return_token_ids``)."""
    choice = response.choices[0]
    usage = response.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
    return list(choice.model_extra["token_ids"]), str(choice.finish_reason), int(cached or 0)
