"""The baselines and process probes of ``weight_offload.py``: HF accelerate disk offload, plain from_pretrained and
AirLLM loaders, peak-RSS readings, page-cache eviction. Runs in the AirLLM venv too (nothing from tiermem here)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


# proc_status and reset_peak_rss repeat what tiermem.stats does on purpose: the AirLLM worker runs this file in its
# own virtual environment, where tiermem is not installed.
def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in KiB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def evict_page_cache(folder: Path) -> int:
    """Drop this folder's files (recursively) from the page cache; returns bytes advised."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += path.stat().st_size
            finally:
                os.close(fd)
    return total


def load_accelerate(model_dir: Path, limit: str, offload_dir: str) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        device_map="auto",
        max_memory={"cpu": limit},
        offload_folder=offload_dir,
        dtype=torch.float32,
        local_files_only=True,
    )
    device_map = dict(getattr(model, "hf_device_map", {}) or {})
    offload_files = [p for p in Path(offload_dir).rglob("*") if p.is_file()]
    info = {
        "device_map": device_map,
        "disk_modules": [name for name, dev in device_map.items() if dev == "disk"],
        "cpu_modules": [name for name, dev in device_map.items() if dev == "cpu"],
        "offload_folder_files": len(offload_files),
        "offload_folder_bytes": sum(p.stat().st_size for p in offload_files),
        "meta_params": sum(1 for _, p in model.named_parameters() if p.device.type == "meta"),
        "resident_param_bytes": sum(
            p.numel() * p.element_size() for _, p in model.named_parameters() if p.device.type != "meta"
        ),
    }
    return model, info


def load_full(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    return model, {"resident_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def load_airllm(model_dir: Path, split_dir: Path | None, no_gc: bool) -> tuple[Any, dict[str, Any], float]:
    import airllm.airllm_base
    import torch
    from airllm import AutoModel
    from airllm.utils import find_or_create_local_splitted_path

    if no_gc:
        airllm.airllm_base.clean_memory = lambda: None

    layer_names = {
        "embed": "model.embed_tokens",
        "layer_prefix": "model.layers",
        "norm": "model.norm",
        "lm_head": "lm_head",
    }
    kwargs: dict[str, Any] = {}
    if split_dir is not None:
        kwargs["layer_shards_saving_path"] = str(split_dir)
    start = time.perf_counter()
    find_or_create_local_splitted_path(str(model_dir), kwargs.get("layer_shards_saving_path"), layer_names=layer_names)
    prepare_s = time.perf_counter() - start
    model = AutoModel.from_pretrained(str(model_dir), device="cpu", dtype=torch.float32, **kwargs)
    info = {
        "airllm_class": type(model).__name__,
        "split_path": str(model.checkpoint_path),
        "streamed_modules": len(getattr(model, "_streamed_indices", [])),
        "prefetching": bool(getattr(model, "prefetching", False)),
        "resident_param_bytes": sum(
            p.numel() * p.element_size() for _, p in model.model.named_parameters() if p.device.type != "meta"
        ),
    }
    return model, info, prepare_s
