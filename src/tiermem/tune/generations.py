"""The two generation folders of a streamed ZO run (``<out>/weights-0``, ``<out>/weights-1``) and their files.

A streamed step reads every layer from the current generation and writes it, updated, into the other one, which
then becomes current (:mod:`tiermem.tune.stream`). The checkpoint names the current folder and each of its files'
SHA-256, so a crash mid-step leaves that folder whole; the other may hold the unfinished step's layers and a torn
``.tmp`` file, which the next step overwrites (every layer is rewritten each step). This module names the files,
verifies a generation against its checkpoint before any compute, and exports one as a sharded HF checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tiermem.errors import TiermemError
from tiermem.tune.checkpoint import sha256_file
from tiermem.tune.layer_files import write_layer
from tiermem.weights.shards import MANIFEST, read_header

FIRST = "weights-0"


def layer_path(folder: Path, index: int) -> Path:
    """Layer ``index``'s file in a generation folder; -1 is the resident group (embeddings, final norm, head)."""
    return folder / ("resident.safetensors" if index < 0 else f"layer_{index:04d}.safetensors")


def other(folder: Path) -> Path:
    """The generation a step writes into while it reads ``folder``."""
    return folder.with_name("weights-1" if folder.name == FIRST else FIRST)


def verify(folder: Path, checksums: dict[str, str]) -> dict[int, str]:
    """Check ``folder``'s files against a checkpoint's ``{layer index: SHA-256}``; return them keyed by int.

    A missing folder, file or a changed byte is a one-line :class:`TiermemError` (a resumed run then stops before
    its first forward pass)."""
    if not (folder / MANIFEST).is_file():
        raise TiermemError(f"corrupt checkpoint: streamed weights folder {folder} is missing")
    for index, expected in checksums.items():
        path = layer_path(folder, int(index))
        if not path.is_file() or sha256_file(path) != expected:
            raise TiermemError(f"corrupt checkpoint: layer {index} in {folder} does not match its SHA-256")
    return {int(k): v for k, v in checksums.items()}


def export_sharded(folder: Path, resident: dict[str, torch.Tensor], num_layers: int, target: Path) -> None:
    """Generation ``folder`` as a sharded HF checkpoint in ``target`` (config and tokenizer are the caller's).

    ``resident`` (the live resident group, a tied weight once) becomes one shard, each layer file is copied as a
    shard, and an index maps every tensor to its file: one file in flight at a time, never the whole model in RAM.
    """
    target.mkdir(parents=True, exist_ok=True)
    write_layer(target / "resident.safetensors", resident)
    weight_map = dict.fromkeys(resident, "resident.safetensors")
    for index in range(num_layers):
        name = layer_path(folder, index).name
        shutil.copy(folder / name, target / name)
        weight_map.update({e.name: name for e in read_header(target / name).tensors})
    index_json = {"metadata": {}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
