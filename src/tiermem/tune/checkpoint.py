"""Training checkpoints: atomic (temporary file, fsync, rename), checksummed, checked before any compute on resume.

A checkpoint is two files in the run's folder: ``checkpoint-<step>.safetensors`` (the trained tensors and the
optimizer's tensors) and ``checkpoint.json`` (the step, the run's settings, the loss curve so far and the tensors'
SHA-256). The tensors are written and renamed into place first, then the JSON that names them, then older tensor
files are removed: a crash at any point leaves the previous checkpoint (or the new one) whole, never half of each.
A ZO run needs nothing else to continue exactly: each step's seed and batch are pure functions of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tiermem.errors import TiermemError

FORMAT = 1
META = "checkpoint.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a torn one."""
    temp = path.with_name(path.name + ".tmp")
    with temp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Save ``tensors`` as safetensors at ``path`` atomically; return the file's SHA-256."""
    temp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(temp))
    with temp.open("rb+") as handle:
        os.fsync(handle.fileno())
    checksum = sha256_file(temp)
    os.replace(temp, path)
    _fsync_dir(path.parent)
    return checksum


def save(folder: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Checkpoint after ``step`` completed steps."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step}.safetensors"
    checksum = save_tensors_atomic(folder / name, tensors)
    record = dict(meta, format=FORMAT, step=step, tensors=name, sha256=checksum)
    write_atomic(folder / META, json.dumps(record).encode())
    for old in folder.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_meta(folder: Path) -> dict[str, Any]:
    """The checkpoint's JSON, validated; the tensor file must exist and match its checksum (a one-line error if not)."""
    path = folder / META
    if not path.is_file():
        raise TiermemError(f"--resume: no checkpoint in {folder} ({META} is missing)")
    try:
        meta = json.loads(path.read_text())
        tensors = folder / str(meta["tensors"])
        expected, step = str(meta["sha256"]), int(meta["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise TiermemError(f"corrupt checkpoint {path}: unreadable JSON or missing fields") from None
    if meta.get("format") != FORMAT:
        raise TiermemError(f"checkpoint {path} has format {meta.get('format')}, this tiermem reads {FORMAT}")
    if not tensors.is_file():
        raise TiermemError(f"corrupt checkpoint {folder}: {tensors.name} is missing")
    if sha256_file(tensors) != expected:
        raise TiermemError(f"corrupt checkpoint {tensors}: its SHA-256 does not match {META}")
    if step < 0:
        raise TiermemError(f"corrupt checkpoint {path}: negative step")
    return meta


def load_tensors(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / str(meta["tensors"])))
    except (SafetensorError, OSError) as exc:
        raise TiermemError(f"corrupt checkpoint {folder}: {exc}") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer's state as flat tensors (``opt:<index>:<key>``) plus its JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"opt:{index}:{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], extra: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt:"):
            _, index, name = key.split(":", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
