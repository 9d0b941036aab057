"""Writing cache entries so that readers and concurrent writers never see half of one.

Several processes can fill the same cache at once (two CLI runs, a server and a sweep, Ray workers on one machine):
each writes into its own uniquely named staging path beside the target and publishes it with one rename. Renames
are atomic, so a reader sees either nothing or a whole entry; when another process publishes the same folder first,
ours is discarded (both were built from the same inputs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty private folder; on a clean exit it becomes ``target``, unless ``target`` appeared meanwhile
    (another process finished first: its folder is kept). On an error the staging folder is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure to publish
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a private path to write; on a clean exit it replaces ``target`` (the last writer wins, whole)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{target.name}.partial-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
