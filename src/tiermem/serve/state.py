"""A session's KV state as one checksummed file: save a :class:`TierCache`, restore it into a fresh one.

The serializer is generic over :class:`TierLayer` subclasses: it walks each layer's attributes and writes tensors
(and :class:`KVBuffer` contents) to a safetensors payload and plain values (ints, floats, bools, strings, lists,
tuples, dicts) to JSON. References the cache rebinds on construction (``info``, ``policy``, ``meter``, ``store``)
are skipped; tiermem objects that layers share (EM-LLM's event boundaries) are written once and restored in place,
so the sharing that ``policy.setup`` builds survives. Blocks in the cache's :class:`BlockStore` are written too.
A value of any other type is a :class:`StateError` naming the layer and attribute: a policy whose state cannot be
written is refused, never saved half.

File layout (little-endian): ``MAGIC``, header length (u64), payload length (u64), SHA-256 of header + payload
(32 bytes), the JSON header, the safetensors payload. The header alone is enough to index a session on start-up;
the checksum is verified before any state is restored. Files are written to a temporary name, fsynced, renamed
and the folder fsynced, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from tiermem.cache import TierCache
from tiermem.errors import TiermemError
from tiermem.kvstore.dense import KVBuffer

MAGIC = b"TIERMEM-SESSION1"
_PREFIX = struct.Struct("<QQ32s")
SKIP = frozenset({"info", "policy", "meter", "store"})  # rebound by TierCache(...) and policy.setup(...)
_PLAIN = (bool, int, float, str, type(None))


class StateError(TiermemError):
    """A cache's state cannot be written, or a session file cannot be read back as it was written."""


class _Encoder:
    """Turns attribute values into JSON-able trees; tensors go to ``self.tensors`` under path-like keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._objects: dict[int, str] = {}  # id of a shared object -> path where it was first written

    def tensor(self, t: torch.Tensor, path: str) -> dict[str, str]:
        self.tensors[path] = t.detach().contiguous().clone()  # safetensors refuses views that share storage
        return {"t": path}

    def value(self, obj: Any, path: str) -> Any:
        if isinstance(obj, _PLAIN):
            return obj
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, torch.dtype):
            return {"dtype": str(obj).removeprefix("torch.")}
        if isinstance(obj, list):
            return [self.value(x, f"{path}.{i}") for i, x in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"tuple": [self.value(x, f"{path}.{i}") for i, x in enumerate(obj)]}
        if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
            return {"dict": {k: self.value(v, f"{path}.{k}") for k, v in obj.items()}}
        if isinstance(obj, dict) and all(isinstance(k, int | tuple) for k in obj):
            items = [
                [self.value(k, f"{path}.key{i}"), self.value(v, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())
            ]
            return {"items": items}
        if id(obj) in self._objects:
            return {"same": self._objects[id(obj)]}
        if isinstance(obj, KVBuffer):
            self._objects[id(obj)] = path
            n = obj.length
            return {
                "kvbuffer": {
                    "class": _class_name(obj),
                    "heads": obj.num_heads,
                    "head_dim": obj.head_dim,
                    "dtype": str(obj.dtype).removeprefix("torch."),
                    "kv_format": obj.format.name,  # rows are saved as stored (int8 rows with their scales)
                    "length": n,
                    "capacity": obj.capacity,
                    "peak_nbytes": obj.peak_nbytes,
                    "reallocations": obj.reallocations,
                    "keys": self.tensor(obj.keys[:, :, :n], f"{path}.keys"),
                    "values": self.tensor(obj.values[:, :, :n], f"{path}.values"),
                    "positions": self.tensor(obj.positions[:, :n], f"{path}.positions"),
                    "scores": self.tensor(obj.scores[:, :n], f"{path}.scores"),
                }
            }
        if type(obj).__module__.startswith("tiermem.") and hasattr(obj, "__dict__"):
            self._objects[id(obj)] = path
            return {"object": {"class": _class_name(obj), "attributes": self.attributes(obj, path)}}
        raise StateError(f"cannot save {path}: values of type {type(obj).__name__} are not serializable")

    def attributes(self, obj: Any, path: str) -> dict[str, Any]:
        return {name: self.value(v, f"{path}.{name}") for name, v in vars(obj).items() if name not in SKIP}


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _class(name: str, path: str) -> Any:
    """A tiermem class by ``module:qualname`` (only tiermem's own: a session file never names other code)."""
    module, _, qualname = name.partition(":")
    if not module.startswith("tiermem.") or not qualname.isidentifier():
        raise StateError(f"session state names a foreign class at {path}: {name}")
    try:
        return getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        raise StateError(f"session state names an unknown class at {path}: {name}") from None


def _decode(enc: Any, tensors: dict[str, torch.Tensor], current: Any, path: str) -> Any:
    """The value ``enc`` stands for; containers and objects the fresh layer already holds are filled in place."""
    if isinstance(enc, _PLAIN):
        return enc
    if isinstance(enc, list):
        items = [_decode(x, tensors, None, f"{path}.{i}") for i, x in enumerate(enc)]
        if isinstance(current, list):  # in place: a list the policy shares between layers stays shared
            current[:] = items
            return current
        return items
    if not isinstance(enc, dict) or len(enc) != 1:
        raise StateError(f"session state is malformed at {path}")
    kind, body = next(iter(enc.items()))
    if kind == "t":
        if body not in tensors:
            raise StateError(f"session state lacks tensor {body}")
        return tensors[body]
    if kind == "dtype":
        return getattr(torch, str(body))
    if kind == "tuple":
        return tuple(_decode(x, tensors, None, f"{path}.{i}") for i, x in enumerate(body))
    if kind == "dict":
        return {k: _decode(v, tensors, None, f"{path}.{k}") for k, v in body.items()}
    if kind == "items":  # a dict with int or tuple keys
        return {
            _decode(k, tensors, None, path): _decode(v, tensors, None, f"{path}.{i}") for i, (k, v) in enumerate(body)
        }
    if kind == "same":
        return current  # restored where it was first written; the fresh cache shares it the same way
    if kind == "kvbuffer":
        if not isinstance(current, KVBuffer):  # created lazily by the layer: make one of the saved class
            cls = _class(body["class"], path)
            rows = tensors[body["scores"]["t"]].shape[0] if body["scores"]["t"] in tensors else 0
            dtype, fmt = getattr(torch, body["dtype"]), body.get("kv_format")
            current = cls(int(body["heads"]), int(body["head_dim"]), dtype, score_rows=rows, kv_format=fmt)
        _fill_buffer(current, body, tensors, path)
        return current
    if kind == "object":
        if current is None or _class_name(current) != body["class"]:  # created lazily: allocate, then fill
            current = object.__new__(_class(body["class"], path))
        restore_attributes(current, body["attributes"], tensors, path)
        return current
    raise StateError(f"session state does not fit this policy's layers at {path} ({kind})")


def _fill_buffer(buffer: KVBuffer, body: dict[str, Any], tensors: dict[str, torch.Tensor], path: str) -> None:
    n = int(body["length"])
    keys, values = _decode(body["keys"], tensors, None, path), _decode(body["values"], tensors, None, path)
    positions, scores = _decode(body["positions"], tensors, None, path), _decode(body["scores"], tensors, None, path)
    fits = keys.shape == (1, buffer.num_heads, n, buffer.row_width) and keys.dtype == buffer.keys.dtype
    if not fits or scores.shape[0] != buffer.scores.shape[0]:
        raise StateError(f"session state at {path} has shapes that do not fit this model")
    buffer.length = 0
    buffer.reserve(max(int(body["capacity"]), n))
    buffer.keys[:, :, :n], buffer.values[:, :, :n] = keys, values
    buffer.positions[:, :n], buffer.scores[:, :n] = positions, scores
    buffer.length = n
    buffer.peak_nbytes, buffer.reallocations = int(body["peak_nbytes"]), int(body["reallocations"])


def restore_attributes(obj: Any, attrs: dict[str, Any], tensors: dict[str, torch.Tensor], path: str) -> None:
    for name, enc in attrs.items():
        # object.__setattr__: frozen dataclasses (calibration records) are restored too
        object.__setattr__(obj, name, _decode(enc, tensors, getattr(obj, name, None), f"{path}.{name}"))


def cache_state(cache: TierCache) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Everything needed to continue ``cache`` later: a JSON tree and the tensors it refers to."""
    encoder = _Encoder()
    layers = [encoder.attributes(layer, f"L{i}") for i, layer in enumerate(cache.tier_layers)]
    counts: dict[int, int] = dict(cache.store._counts)  # blocks per layer; ids run 0, 1, 2, ...
    for layer, count in counts.items():
        for block in range(count):
            keys, values = cache.store.get(layer, block)
            encoder.tensor(keys, f"store.{layer}.{block}.k")
            encoder.tensor(values, f"store.{layer}.{block}.v")
    return {"layers": layers, "blocks": {str(k): v for k, v in counts.items()}}, encoder.tensors


def restore_cache(cache: TierCache, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put a saved state into ``cache``, freshly built with the same model and policy (``repr`` equal)."""
    if len(state["layers"]) != len(cache.tier_layers):
        raise StateError("session state has a different number of layers than this model")
    for layer, block_count in sorted((int(k), int(v)) for k, v in state["blocks"].items()):
        for block in range(block_count):
            keys, values = tensors.get(f"store.{layer}.{block}.k"), tensors.get(f"store.{layer}.{block}.v")
            if keys is None or values is None:
                raise StateError(f"session state lacks block {block} of layer {layer}")
            cache.store.put(layer, keys, values)
    for i, (layer, attrs) in enumerate(zip(cache.tier_layers, state["layers"], strict=True)):
        restore_attributes(layer, attrs, tensors, f"L{i}")
        layer.report()


STALE_TEMPORARY_SECONDS = 600.0  # a write takes seconds; a temporary this old was left by a killed writer


def temporary_path(path: Path) -> Path:
    """Where :func:`write_file` writes ``path``'s bytes before the rename."""
    return path.with_name(f".{path.name}.tmp")


def remove_stale_temporaries(folder: Path, suffix: str, older_than: float = STALE_TEMPORARY_SECONDS) -> int:
    """Delete the temporaries of ``*suffix`` files in ``folder`` not touched for ``older_than`` seconds (a kill
    during a write leaves one; the next write of that session would overwrite it, but a session never written again
    would keep it forever). Younger ones are left alone: another server sharing the folder may be writing them."""
    removed = 0
    now = time.time()
    for tmp in folder.glob(f".*{suffix}.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed += 1
        except OSError:  # gone already (another server swept it) or not ours to delete
            continue
    return removed


def write_file(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    """Write atomically and durably (temporary file, fsync, rename, fsync of the folder); returns the size."""
    payload = save_tensors(tensors) if tensors else b""
    head = json.dumps(header, separators=(",", ":")).encode()
    digest = hashlib.sha256(head)
    digest.update(payload)
    tmp = temporary_path(path)
    with tmp.open("wb") as handle:
        handle.write(MAGIC)
        handle.write(_PREFIX.pack(len(head), len(payload), digest.digest()))
        handle.write(head)
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return len(MAGIC) + _PREFIX.size + len(head) + len(payload)


def _open(path: Path) -> tuple[Any, int, int, bytes]:
    handle = path.open("rb")
    magic = handle.read(len(MAGIC))
    prefix = handle.read(_PREFIX.size)
    if magic != MAGIC or len(prefix) != _PREFIX.size:
        handle.close()
        raise StateError(f"{path.name} is not a tiermem session file (or is truncated)")
    head_len, payload_len, digest = _PREFIX.unpack(prefix)
    return handle, head_len, payload_len, digest


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header only (for indexing); the checksum is not verified here."""
    handle, head_len, _, _ = _open(path)
    with handle:
        head = handle.read(head_len)
    try:
        header = json.loads(head)
    except ValueError:
        raise StateError(f"{path.name} has a corrupt header") from None
    if not isinstance(header, dict):
        raise StateError(f"{path.name} has a corrupt header")
    return header


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors, after checking the size and the SHA-256 of both."""
    handle, head_len, payload_len, digest = _open(path)
    with handle:
        head = handle.read(head_len)
        payload = handle.read(payload_len + 1)
    if len(head) != head_len or len(payload) != payload_len:
        raise StateError(f"{path.name} is truncated or has trailing bytes")
    check = hashlib.sha256(head)
    check.update(payload)
    if check.digest() != digest:
        raise StateError(f"{path.name} is corrupt (checksum mismatch)")
    return json.loads(head), (load_tensors(payload) if payload else {})
