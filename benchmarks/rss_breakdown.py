"""Where a tiermem decode process's resident memory goes (issue 11): RSS by stage, model tensors by kind, mappings.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rss_breakdown.py --formats fast --tokens 512 --steps 32
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rss_breakdown.py --formats exact

Stages: after ``import torch``, ``import transformers``, ``tiermem.models.load`` (the load's own peak is VmHWM then),
and after a needle prompt of ``--tokens`` tokens plus ``--steps`` decode forwards, run after a warm-up with the peak
reset as ``llamacpp_compare.py`` measures it. Memory only: times on a shared machine mean nothing here.
``--trim-after-warmup`` returns the heap the warm-up freed before the peak is reset. ``--ids FILE`` writes the
generated ids (JSON), ``--check FILE`` compares them with a file written before.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from _machine import peak_rss_mib, reset_peak_rss

MIB = 2**20


def status() -> dict[str, float]:
    """VmRSS, VmHWM and the RSS split (anonymous, file-backed) in MiB, from /proc/self/status."""
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024
    return out


def mapped_files() -> dict[str, float]:
    """Resident MiB of each file-backed mapping group: safetensors files by name, shared libraries, the rest."""
    groups: dict[str, float] = {}
    name = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split(None, 5)
            path = parts[5] if len(parts) > 5 else ""
            if path.endswith(".safetensors"):
                name = "safetensors: " + Path(path).name
            elif ".so" in path:
                name = "shared libraries (.so)"
            elif path.startswith("/") and not path.startswith("/dev"):
                name = "other files"
            else:
                name = ""  # anonymous memory, heap, stack: counted by RssAnon
        elif line.startswith("Rss:") and name:
            groups[name] = groups.get(name, 0.0) + int(line.split()[1]) / 1024
    return {k: round(v, 1) for k, v in sorted(groups.items())}


def malloc_free_mib() -> float | None:
    """Bytes glibc's malloc holds free in its arenas (``mallinfo2().fordblks``): RSS that ``malloc_trim`` can return."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (f, ctypes.c_size_t)
            for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        ] + [("keepcost", ctypes.c_size_t)]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return round(libc.mallinfo2().fordblks / MIB, 1)
    except (OSError, AttributeError):
        return None


def tensor_kinds(model: Any) -> dict[str, float]:
    """MiB held by the model's parameters and buffers by kind (each storage counted once, whole: a fused q/k/v
    storage is counted where its first view is met)."""
    from torch import nn

    from tiermem.weights.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    head = model.get_output_embeddings()
    kinds: dict[str, float] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            if isinstance(module, Int4WeightOnlyLinear):
                kind = "int4 packed weights" if name == "weight" else "int4 scales+zeros"
            elif isinstance(module, Int8WeightOnlyLinear):
                part = "weights" if name == "weight" else "scales"
                kind = f"int8 LM head {part}" if module is head else f"int8 {part}"
            elif isinstance(module, nn.Embedding):
                kind = f"embedding table ({str(t.dtype).removeprefix('torch.')})"
            elif isinstance(module, nn.Linear):
                kind = f"float Linear weights ({str(t.dtype).removeprefix('torch.')}; LM head: {module is head})"
            elif "rotary" in mod_name or "inv_freq" in name:
                kind = "rotary tables"
            elif "norm" in mod_name:
                kind = "norm weights"
            else:
                kind = f"other ({mod_name}.{name})"
            kinds[kind] = kinds.get(kind, 0.0) + t.untyped_storage().nbytes() / MIB  # views: their whole storage
    return {k: round(v, 2) for k, v in sorted(kinds.items())}


def snapshot(label: str, rows: list[dict[str, Any]]) -> None:
    row = {"stage": label, **status(), "malloc_free_mib": malloc_free_mib(), "files": mapped_files()}
    rows.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--formats", choices=("fast", "exact"), default="fast")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ids", help="write the generated token ids here (JSON)")
    parser.add_argument("--check", help="compare the generated token ids with this JSON file")
    parser.add_argument("--out", help="write every stage and the tensor table here (JSON)")
    parser.add_argument(
        "--trim-after-warmup", action="store_true", help="malloc_trim after the warm-up (an engine-side trim)"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    snapshot("start (python + _machine)", rows)
    import torch

    snapshot("import torch", rows)
    import transformers  # noqa: F401

    snapshot("import transformers", rows)
    import tiermem.engine as engine
    from tiermem.bench.tasks import make_sample
    from tiermem.engine import GenerationConfig, generate
    from tiermem.formats import apply_preset
    from tiermem.kvstore.blocks import StoreConfig
    from tiermem.memory import build
    from tiermem.models import load
    from tiermem.prompts import build_prompt

    snapshot("import tiermem (engine, memory, models)", rows)
    torch.set_num_threads(args.threads)
    engine.stop_token_ids = lambda lm: set()  # exactly `steps` decode forwards, as llamacpp_compare.py does
    preset = argparse.Namespace(formats=args.formats, dtype=None, weights_quant=None, kv_dtype=None)
    apply_preset(preset)
    start = time.perf_counter()
    lm = load(args.model, preset.dtype, weights_quant=preset.weights_quant)
    load_seconds = time.perf_counter() - start
    snapshot(f"load ({lm.weights_format}, {preset.dtype}); VmHWM = the load's peak", rows)
    kinds = tensor_kinds(lm.model)
    store = StoreConfig(kv_dtype=preset.kv_dtype)
    sample = make_sample("needle", lm.tokenizer, args.tokens, 0.5, 0, 0)
    prompt = build_prompt(lm, sample.context, sample.question, "auto", sample.answer_prefix)
    warm = build_prompt(lm, sample.context[: len(sample.context) // 2], sample.question, "auto", sample.answer_prefix)
    generate(lm, warm, build("full"), GenerationConfig(max_new_tokens=5, store=store))
    snapshot("after warm-up", rows)
    if args.trim_after_warmup:
        from tiermem.models import release_free_memory

        release_free_memory()
        snapshot("after warm-up + malloc_trim", rows)
    reset_peak_rss()
    result = generate(lm, prompt, build("full"), GenerationConfig(max_new_tokens=args.steps + 1, store=store))
    snapshot(f"after {prompt.num_tokens}-token prefill + {args.steps} decode steps", rows)
    print(json.dumps({"tensors_mib": kinds, "tensors_total_mib": round(sum(kinds.values()), 1)}))
    summary = {
        "formats": f"{lm.weights_format}/{preset.dtype}/{preset.kv_dtype}",
        "load_seconds": round(load_seconds, 1),
        "run_peak_rss_mib": round(peak_rss_mib(), 1),
        "kv_bytes_decode_mib": round(result.stats.kv_bytes_decode / MIB, 1),
        "token_ids": result.token_ids,
    }
    print(json.dumps(summary))
    if args.ids:
        Path(args.ids).write_text(json.dumps(result.token_ids))
    if args.out:
        Path(args.out).write_text(json.dumps({"stages": rows, "tensors_mib": kinds, **summary}, indent=1))
    if args.check:
        before = json.loads(Path(args.check).read_text())
        same = before == result.token_ids
        print(f"token ids {'IDENTICAL' if same else 'DIFFER'} to {args.check}")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
