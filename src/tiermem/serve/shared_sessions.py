"""Session and response stores over a folder that several servers share (``tiermem serve --ray`` replicas).

:class:`SessionStore` indexes its folder once, at start-up; a replica that takes over a conversation from a
replica that died (or was scaled down, or lost the conversation's hash range to a new replica) must see the files
written since. :class:`SharedSessionStore` looks at the folder before each lookup of a turn's session (``match``):
when the listing changed (a name or a modification time), it indexes again and merges:

- a file this store does not know: another server's session, indexed on disk (restored on its turn, checksummed);
- a known session whose file another server rewrote: this store's RAM copy is older than the file, so it is
  dropped and the session is indexed from the file (the next turn restores the newer state);
- a known session whose file vanished (another server dropped it at its disk limit): forgotten unless it is in
  RAM here;
- this store's own writes are recorded as they happen, so they never count as another server's.

Consistent hashing keeps a conversation on one replica, so two servers rarely hold the same session at once;
when they do (a turn routed elsewhere while its replica restarts), each write is a whole, checksummed, atomically
renamed file of one consistent (tokens, KV) pair, so the worst case is a turn that prefills more than it needed.
The listing costs one ``stat`` per session file per turn (a million files would want a manifest instead).

:class:`SharedResponseStore` reads ``responses.jsonl`` again when asked for a response it does not hold, so a
``previous_response_id`` made on another replica is found.
"""

from __future__ import annotations

from typing import Any

from tiermem.serve.responses import ResponseStore
from tiermem.serve.sessions import SUFFIX, SessionStore


class SharedSessionStore(SessionStore):
    """A :class:`SessionStore` whose folder other servers write too (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._listing = self._list()

    def _list(self) -> dict[str, int]:
        listing = {}
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                listing[path.name] = path.stat().st_mtime_ns
            except FileNotFoundError:  # dropped by another server between the glob and the stat
                continue
        return listing

    def refresh(self) -> None:
        """Take in what other servers wrote since the last look (see the module docstring)."""
        listing = self._list()
        if listing == self._listing:
            return
        changed = {name for name, mtime in listing.items() if self._listing.get(name) != mtime}
        self._listing = listing
        sessions: dict[str, Any] = self.sessions
        mine = dict(sessions)
        sessions.clear()
        self._index()  # the folder's view, parsed the way start-up parses it
        theirs = dict(sessions)
        merged: dict[str, Any] = {}
        for sid, session in mine.items():
            name = f"{sid}{SUFFIX}"
            rewritten = name in changed and sid in theirs
            if session.busy or (not rewritten and (name in listing or session.in_ram)):
                merged[sid] = session  # ours is current (or mid-turn, or new and not yet written)
            elif rewritten:
                self._unload(session)  # another server moved it on: its file is newer than our RAM copy
        for sid, session in theirs.items():
            merged.setdefault(sid, session)
        with self._lock:
            sessions.clear()
            sessions.update(merged)

    def match(self, *args: Any, **kwargs: Any) -> Any:
        self.refresh()  # every lookup of a turn's session starts here (the worker's and acquire's own)
        return super().match(*args, **kwargs)

    def save(self, session: Any) -> None:
        super().save(session)
        path = self.folder / f"{session.id}{SUFFIX}"
        self._listing[path.name] = path.stat().st_mtime_ns  # our own write: not news on the next look


class SharedResponseStore(ResponseStore):
    """A :class:`ResponseStore` that reads the shared file again on a miss (a response made by another server)."""

    def get(self, owner: str, ident: str) -> dict[str, Any]:
        if ident not in self.records and self.path.exists():
            fresh = ResponseStore(self.path.parent, self.durable)
            with self._lock:
                for key, record in fresh.records.items():
                    self.records.setdefault(key, record)
        return super().get(owner, ident)
