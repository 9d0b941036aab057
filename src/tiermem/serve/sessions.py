"""Chat sessions whose KV state outlives a turn: matched by token prefix, kept in RAM, spilled to disk, dropped.

A session is the token ids its cache holds (in order), the cache, and the next-token logits after those ids.
A request is matched to the stored session of the same owner (API key) with the longest common token prefix,
compared token by token (no hash stands in for the tokens). Then:

- the session holds exactly a prefix of the request: prefill only the rest (all of it "cached");
- the request diverges inside the session's last answer (a chat template re-renders the answer with other token
  ids, a client edits the reply): a dense full-attention cache is truncated to the common prefix in place;
- it diverges earlier (another conversation with the same start): a dense cache is copied, and the copy truncated;
- a compressed cache cannot be truncated (what it dropped depended on the tokens after the cut): prefill anew.

Every file carries the key (model fingerprint, ``repr`` of the server's policy with its parameters, dtype) and the
policy the session runs under (the same, or the one ``--policy auto`` chose at its first turn, rebuilt and checked
by ``repr`` on restore: :mod:`tiermem.serve.policies`); files of another key are never indexed, so state is never
reused across models, policies or dtypes.

Memory: ``kv_memory`` bounds the KV bytes of all sessions in RAM, checked after each turn: idle sessions are
spilled to disk least recently used first and restored on their next turn. ``disk_limit`` bounds the session files;
past it the least recently used idle session is dropped, with a line in ``dropped.jsonl``. With ``durable`` every
session is written (atomically, fsynced) after each turn, before its response ends.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiermem.cache import TierCache
from tiermem.errors import TiermemError
from tiermem.memory.base import Policy
from tiermem.serve.policies import SessionPolicies
from tiermem.serve.rewind import common_prefix, truncatable, truncate
from tiermem.serve.state import (
    StateError,
    cache_state,
    read_file,
    read_header,
    remove_stale_temporaries,
    restore_cache,
    write_file,
)

log = logging.getLogger("tiermem.serve")
SUFFIX = ".session"
FORMAT = 2  # 2: the session names its own policy (auto chooses per session)
MIN_FORK_TOKENS = 16  # copying a cache to reuse fewer tokens than this costs more than prefilling them


class SessionUnavailable(TiermemError):
    """A stored session matched the request but its file cannot be restored (corrupt, truncated, foreign)."""

    def __init__(self, session_id: str, reason: str):
        super().__init__(
            f"session {session_id} could not be restored ({reason}); it was set aside: retry to start over"
        )
        self.session_id = session_id


@dataclass
class Session:
    id: str
    owner: str
    tokens: np.ndarray  # (n,) int64: the ids the cache holds, in order
    prompt_len: int  # tokens held before the last turn's answer began
    last_used: float
    policy: Policy  # what its cache is built by: the server's policy, or the one auto chose at its first turn
    cache: TierCache | None = None  # None while the session lives on disk only
    logits: torch.Tensor | None = None  # (vocab,) float32: next-token logits after ``tokens``
    file_bytes: int = 0
    dirty: bool = True  # RAM state newer than the file
    busy: bool = False  # a turn is running on it

    @property
    def in_ram(self) -> bool:
        return self.cache is not None

    def ram_bytes(self) -> int:
        if self.cache is None:
            return 0
        logits = self.logits.numel() * self.logits.element_size() if self.logits is not None else 0
        return self.cache.kv_bytes() + logits


@dataclass
class Lease:
    """A session ready for a turn and how many of the request's tokens it already holds."""

    session: Session
    reused: int
    fresh: bool  # a new cache: plan it and end its context after the prompt


@dataclass
class StoreStats:
    sessions: dict[str, int] = field(default_factory=dict)  # tier -> count
    bytes: dict[str, int] = field(default_factory=dict)  # tier -> bytes
    dropped: int = 0
    spilled: int = 0
    restored: int = 0
    corrupt: int = 0


class SessionStore:
    """Sessions in RAM and in ``folder``, for one key. Not thread-safe for mutation: the model worker owns it;
    :meth:`stats` may be read from other threads."""

    def __init__(
        self,
        folder: Path,
        key: dict[str, str],
        policies: SessionPolicies,
        make_cache: Callable[[Policy], TierCache],
        kv_memory: int | None = None,
        disk_limit: int | None = None,
        durable: bool = True,
    ):
        self.folder = folder
        self.key = key
        self.policies = policies
        self.make_cache = make_cache
        self.kv_memory = kv_memory
        self.disk_limit = disk_limit
        self.durable = durable
        self.sessions: dict[str, Session] = {}
        self.counters = StoreStats()
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        self._index()

    # -- start-up ------------------------------------------------------------------------------------------------
    def _index(self) -> None:
        """Index the session files of this key left by an earlier run (headers only; checksums on restore), after
        deleting temporaries that a killed writer left (:func:`remove_stale_temporaries`)."""
        if removed := remove_stale_temporaries(self.folder, SUFFIX):
            log.warning("removed %d stale temporary session files from %s", removed, self.folder)
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                header = read_header(path)
            except (StateError, OSError) as exc:
                self._set_aside(path, str(exc))
                continue
            if header.get("format") != FORMAT or header.get("key") != self.key:
                continue  # another model, policy or dtype: not ours to reuse or to delete
            sid = str(header.get("id", ""))
            if path.name != f"{sid}{SUFFIX}":
                self._set_aside(path, "its name does not match its id")
                continue
            try:
                policy = self.policies.rebuild(header.get("policy"))
            except StateError as exc:
                self._set_aside(path, str(exc))
                continue
            tokens = np.asarray(header["tokens"], dtype=np.int64)
            self.sessions[sid] = Session(
                sid, str(header["owner"]), tokens, int(header["prompt_len"]), float(header["last_used"]), policy,
                file_bytes=path.stat().st_size, dirty=False,
            )  # fmt: skip
        if self.sessions:
            log.info("indexed %d stored sessions in %s", len(self.sessions), self.folder)

    # -- matching ------------------------------------------------------------------------------------------------
    def match(self, owner: str, ids: np.ndarray) -> tuple[Session | None, int]:
        """The session of ``owner`` sharing the longest token prefix with ``ids`` (ties: most recent)."""
        best: Session | None = None
        best_len = 0
        for session in self.sessions.values():
            if session.owner != owner or session.busy:
                continue
            n = common_prefix(session.tokens, ids)
            if n > best_len or (n == best_len and n and best is not None and session.last_used > best.last_used):
                best, best_len = session, n
        return best, best_len

    def acquire(self, owner: str, ids: np.ndarray, policy: Policy, reuse: bool = True) -> Lease:
        """A session to run a turn for ``ids`` on, in RAM and marked busy (see the module docstring); a new one
        runs under ``policy``. ``reuse=False``: always a new session."""
        session, shared = self.match(owner, ids) if reuse else (None, 0)
        lease = self._reuse(session, shared, ids) if session is not None and shared else None
        if lease is None:
            lease = Lease(self._new(owner, policy), 0, True)
        lease.session.busy = True
        lease.session.last_used = time.time()
        return lease

    def _reuse(self, session: Session, shared: int, ids: np.ndarray) -> Lease | None:
        held = len(session.tokens)
        self._load(session)
        assert session.cache is not None
        if shared == held and (len(ids) > held or session.logits is not None):
            return Lease(session, held, False)  # the request continues the session
        cut = min(shared, len(ids) - 1)  # at least one token is fed, for the next-token logits
        if cut < 1 or not truncatable(session.cache, cut):
            return None
        # Divergence inside the last answer (or a retry of the last prompt): this conversation moved on, truncate
        # in place. Earlier: another conversation may still continue this session, so work on a copy.
        if cut < session.prompt_len - 1:
            if cut < MIN_FORK_TOKENS:
                return None
            session = self._fork(session)
        assert session.cache is not None
        truncate(session.cache, cut)
        session.tokens = session.tokens[:cut].copy()
        session.prompt_len = min(session.prompt_len, cut)
        session.logits = None
        session.dirty = True
        return Lease(session, cut, False)

    def _new(self, owner: str, policy: Policy) -> Session:
        sid = f"sess_{secrets.token_hex(16)}"  # unguessable, and safe as a file name
        tokens = np.zeros(0, dtype=np.int64)
        session = Session(sid, owner, tokens, 0, time.time(), policy, cache=self.make_cache(policy))
        with self._lock:
            self.sessions[sid] = session
        return session

    def _fork(self, session: Session) -> Session:
        assert session.cache is not None
        state, tensors = cache_state(session.cache)
        copy = self._new(session.owner, session.policy)
        assert copy.cache is not None
        restore_cache(copy.cache, state, tensors)
        copy.tokens, copy.prompt_len = session.tokens.copy(), session.prompt_len
        return copy

    # -- after a turn --------------------------------------------------------------------------------------------
    def release(self, session: Session, ok: bool = True) -> None:
        """End a turn. ``ok=False`` (the turn failed midway) discards the RAM state: the file, if any, still holds
        the state before the turn. Then write it (durable mode) and enforce the RAM and disk limits."""
        session.busy = False
        session.last_used = time.time()
        if not ok:
            self._unload(session)
            if not session.file_bytes:
                self._forget(session)
                return
            # The turn may have cut or grown the ids before it failed: the index must hold the file's again, or the
            # next match trusts ids the restored cache lacks (wrong cached_tokens, wrong answer)
            try:
                header = read_header(self.folder / f"{session.id}{SUFFIX}")
                tokens, prompt_len = np.asarray(header["tokens"], dtype=np.int64), int(header["prompt_len"])
            except (StateError, OSError, KeyError, TypeError, ValueError):
                self._forget(session)  # its file is unreadable: the next restore would set it aside anyway
                return
            with self._lock:
                session.tokens, session.prompt_len = tokens, prompt_len
            return
        session.dirty = True
        if self.durable:
            self.save(session)
        self.enforce()

    def save(self, session: Session) -> None:
        assert session.cache is not None
        state, tensors = cache_state(session.cache)
        if session.logits is not None:
            tensors["logits"] = session.logits.contiguous()
        header: dict[str, Any] = {
            "format": FORMAT,
            "key": self.key,
            "id": session.id,
            "owner": session.owner,
            "policy": SessionPolicies.spec(session.policy),
            "tokens": session.tokens.tolist(),
            "prompt_len": session.prompt_len,
            "last_used": session.last_used,
            "state": state,
        }
        size = write_file(self.folder / f"{session.id}{SUFFIX}", header, tensors)
        with self._lock:
            session.file_bytes, session.dirty = size, False

    def enforce(self) -> None:
        """Spill idle sessions (LRU) while RAM holds more than ``kv_memory``; drop idle ones (LRU) while the files
        take more than ``disk_limit``."""
        idle = sorted((s for s in self.sessions.values() if not s.busy), key=lambda s: s.last_used)
        if self.kv_memory is not None:
            total = sum(s.ram_bytes() for s in self.sessions.values())
            for session in idle:
                if total <= self.kv_memory:
                    break
                if session.in_ram:
                    total -= session.ram_bytes()
                    self.spill(session)
        if self.disk_limit is not None:
            total = sum(s.file_bytes for s in self.sessions.values())
            for session in idle:
                if total <= self.disk_limit:
                    break
                if session.file_bytes:
                    total -= session.file_bytes
                    self.drop(session, "the session disk limit is full")

    def spill(self, session: Session) -> None:
        if session.dirty:
            self.save(session)
        self._unload(session)
        self.counters.spilled += 1

    def drop(self, session: Session, reason: str) -> None:
        """Forget a session everywhere, with a record in ``dropped.jsonl``."""
        record = {"time": time.time(), "session": session.id, "tokens": len(session.tokens), "reason": reason}
        with (self.folder / "dropped.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        log.warning("dropped session %s (%d tokens): %s", session.id, len(session.tokens), reason)
        self._unload(session)
        (self.folder / f"{session.id}{SUFFIX}").unlink(missing_ok=True)
        self._forget(session)
        self.counters.dropped += 1

    def close(self) -> None:
        """On shutdown: write sessions whose RAM state is newer than their file."""
        for session in list(self.sessions.values()):
            if session.in_ram and session.dirty and not session.busy:
                self.save(session)
            self._unload(session)

    # -- restore -------------------------------------------------------------------------------------------------
    def _load(self, session: Session) -> None:
        if session.in_ram:
            return
        path = self.folder / f"{session.id}{SUFFIX}"
        try:
            header, tensors = read_file(path)
            if header.get("key") != self.key or header.get("id") != session.id:
                raise StateError("it belongs to another model, policy or dtype")
            if self.policies.rebuild(header.get("policy")) is not session.policy:
                raise StateError("it was written under another policy than its index says")
            cache = self.make_cache(session.policy)
            try:
                restore_cache(cache, header["state"], tensors)
            except Exception:
                cache.close()
                raise
        except (StateError, OSError, KeyError, ValueError, RuntimeError) as exc:
            self._forget(session)
            self._set_aside(path, str(exc))
            self.counters.corrupt += 1
            raise SessionUnavailable(session.id, str(exc)) from None
        with self._lock:
            session.cache, session.logits = cache, tensors.get("logits")
            session.tokens = np.asarray(header["tokens"], dtype=np.int64)
            session.prompt_len, session.dirty = int(header["prompt_len"]), False
        self.counters.restored += 1

    def _unload(self, session: Session) -> None:
        with self._lock:
            if session.cache is not None:
                session.cache.close()
            session.cache, session.logits = None, None

    def _forget(self, session: Session) -> None:
        with self._lock:
            self.sessions.pop(session.id, None)

    def _set_aside(self, path: Path, reason: str) -> None:
        log.error("session file %s set aside: %s", path.name, reason)
        if path.exists():
            path.rename(path.with_name(path.name + ".corrupt"))

    # -- accounting ----------------------------------------------------------------------------------------------
    def owned(self, owner: str) -> list[dict[str, Any]]:
        """The sessions of ``owner``, most recent first, for the status view."""
        with self._lock:
            sessions = [s for s in self.sessions.values() if s.owner == owner]
        rows = [
            {
                "id": s.id,
                "tokens": len(s.tokens),
                "tier": "ram" if s.in_ram else "disk",
                "policy": s.policy.name,
                "ram_bytes": s.ram_bytes(),
                "file_bytes": s.file_bytes,
                "last_used": s.last_used,
                "busy": s.busy,
            }
            for s in sessions
        ]
        return sorted(rows, key=lambda r: -r["last_used"])

    def stats(self) -> StoreStats:
        with self._lock:
            sessions = list(self.sessions.values())
        out = StoreStats(**{k: v for k, v in vars(self.counters).items() if k not in ("sessions", "bytes")})
        out.sessions = {"ram": sum(s.in_ram for s in sessions), "disk": sum(bool(s.file_bytes) for s in sessions)}
        out.bytes = {"ram": sum(s.ram_bytes() for s in sessions), "disk": sum(s.file_bytes for s in sessions)}
        return out
