"""Resident weights loaded in little more memory than they end up taking: the model built empty and filled by plain
reads, each decoder layer quantized as soon as it is read, the LM head quantized a block of rows at a time, and the
heap's freed memory handed back to the operating system (issue 11; BENCHMARKS.md "Memory at the default formats").
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from tiermem.formats import source_types, weight_modes
from tiermem.weights.loaders import read_tensor_into
from tiermem.weights.quant import Int8WeightOnlyLinear, QuantReport, quantize_weights
from tiermem.weights.shards import group_of, read_header

HEAD_ROWS = 4096  # the LM head is quantized this many output rows at a time (quantize_head)


def release_free_memory() -> bool:
    """Give the memory glibc's ``malloc`` holds free back to the operating system (``malloc_trim(0)``).

    Freed blocks below the mmap threshold stay in the heap, and the threshold itself rises to the size of the
    largest block freed (up to 32 MiB): after a load, the float weights that quantization replaced are such holes,
    resident for the life of the process (measured: 200-540 MiB of a SmolLM2 process, depending on the order of
    frees). False where there is no glibc."""
    gc.collect()  # modules swapped out by quantization may sit in reference cycles
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _layer_view(model: Any, index: int) -> nn.Module:
    """A container whose only child path is ``layers.<index>``, so :func:`quantize_weights` sees the decoder layer's
    Linears under their full names (``layers.3.mlp.down_proj``, which ``auto`` looks up) without the rest."""
    holder, layers = nn.Module(), nn.ModuleDict()
    layers.add_module(str(index), model.get_decoder().layers[index])
    holder.add_module("layers", layers)
    return holder


def quantize_head(model: Any) -> QuantReport | None:
    """The LM head in int8 (as :func:`quantize_weights` makes it, every mode) :data:`HEAD_ROWS` output rows at a
    time, then stacked; None when the head is not a plain bias-free ``nn.Linear``.

    Per-channel int8 treats each row on its own, so the result is the same tensors; quantizing the whole head at
    once holds several float32 copies of it (4 x 113 MB for SmolLM2's 49152 x 576 table: the load's peak).
    """
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    table = head.weight.detach()
    parts = []
    for start in range(0, head.out_features, HEAD_ROWS):
        rows = nn.Linear(head.in_features, 1, bias=False, device="meta", dtype=table.dtype)
        rows.weight = nn.Parameter(table[start : start + HEAD_ROWS], requires_grad=False)  # a view: no copy
        rows.out_features = rows.weight.shape[0]
        parts.append(Int8WeightOnlyLinear(rows))
    stacked = Int8WeightOnlyLinear.concatenated(parts)
    del parts
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head:
                setattr(parent, name, stacked)
    before = table.numel() * table.element_size()
    after = sum(t.numel() * t.element_size() for t in (stacked.weight, stacked.scales))
    return QuantReport("int8", None, 1, before, after)


def load_resident(
    source: Path, dtype: torch.dtype, weights_quant: str, quant_group: int
) -> tuple[PreTrainedModel, QuantReport] | None:
    """Build the model empty and fill it from its safetensors files with plain reads, one decoder layer at a time,
    quantizing each layer as soon as it is filled; None when the checkpoint does not map one to one onto the model
    (renamed, missing, extra or reshaped tensors, modules kept in float32), or when every tensor is stored in
    ``dtype`` and nothing is quantized: transformers then loads it.

    ``from_pretrained`` maps the files (their pages count in RSS until the load ends) and holds every float weight
    until the model is quantized: a float32 SmolLM2 in bfloat16 peaked at 1.16 GiB. Here the peak is the quantized
    model plus one layer in ``dtype``. (A float32 file loaded in float32 is not copied by ``from_pretrained``: the
    parameters view the map, so its pages are the weights, not a second copy.) Values are those ``from_pretrained``
    gives (the same ``copy_`` rounding; ``tests/test_load_memory.py`` compares every tensor).
    """
    files = sorted(source.glob("*.safetensors"))
    if not files:
        return None
    shards = [read_header(f) for f in files]
    if weights_quant == "none" and all(e.dtype == dtype for shard in shards for e in shard.tensors):
        return None  # stored as used: from_pretrained's weights are the mapped file's pages (zero-copy, reclaimable)
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    with no_init_weights():  # every persistent tensor is read below; non-persistent buffers are computed as usual
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_weights ties them, and no_init_weights skips it
    if model._keep_in_fp32_modules or model._keep_in_fp32_modules_strict:
        return None
    targets = model.state_dict(keep_vars=True)  # tied weights appear under each name, as one tensor
    stored = {e.name: (shard, e) for shard in shards for e in shard.tensors}
    unique = {id(t) for t in targets.values()}
    filled = {id(targets[n]) for n in stored if n in targets}
    if len(filled) != len(unique) or any(
        n not in targets or tuple(targets[n].shape) != e.shape for n, (_, e) in stored.items()
    ):
        return None
    if len([n for n in stored if id(targets[n]) in filled]) != len(filled):  # both names of a tied pair stored
        return None
    per_module = weight_modes(source_types(source)) if weights_quant == "auto" else None
    reports: list[QuantReport] = []
    groups: dict[str, list[str]] = {}
    for name in stored:
        groups.setdefault(group_of(name), []).append(name)
    layer_ids = sorted(int(g) for g in groups if g.isdigit())
    handles = {shard.path: shard.path.open("rb", buffering=0) for shard in shards}
    try:
        for group in [*map(str, layer_ids), "resident"]:
            for name in groups.get(group, []):
                shard, entry = stored[name]
                read_tensor_into(handles[shard.path], shard, entry, targets[name].data)
            if weights_quant != "none" and group != "resident":  # the head and anything outside layers come last
                for name in groups[group]:  # this layer's float weights go with the Linears quantization replaces
                    del targets[name]
                reports.append(quantize_weights(_layer_view(model, int(group)), weights_quant, quant_group, per_module))
    finally:
        for handle in handles.values():
            handle.close()
    del targets
    head = quantize_head(model) if weights_quant != "none" else None
    reports += [head] if head is not None else []
    reports.append(quantize_weights(model, weights_quant, quant_group, per_module))  # any Linear left
    int4 = sum(r.int4_modules for r in reports)
    report = QuantReport(
        weights_quant,
        quant_group if int4 else None,
        sum(r.modules for r in reports),
        sum(r.bytes_before for r in reports),
        sum(r.bytes_after for r in reports),
        int4,
    )
    generation = source / "generation_config.json"
    if generation.is_file():  # from_pretrained reads it too (stop tokens)
        model.generation_config = GenerationConfig.from_pretrained(str(source), local_files_only=True)
    return model, report
