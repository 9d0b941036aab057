"""Which number formats a run uses when the user names none: the ``fast`` preset, and ``exact``.

``tiermem generate``, ``bench``, ``serve`` and ``demo`` take ``--formats fast`` by default (issue 11, "fast by
default"); ``--formats exact`` is the float32 model as loaded, and ``--dtype``, ``--weights-quant`` and
``--kv-dtype`` override single parts of either preset.

``fast`` is chosen, not tuned per model:

- activations and float weights in **bfloat16** when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX in
  ``/proc/cpuinfo``; elsewhere bfloat16 is emulated and slower than float32, so the whole preset falls back to
  ``exact``);
- Linear weights **never in fewer bits than the checkpoint ships them, and re-coded only where that is exact**: a
  layer stored as GGUF Q4_1 (per 32 values ``d * q + m``, ``q`` in 0..15, with the block's minimum at code 0 and its
  maximum at code 15) runs on the int4 kernel in groups of 32, whose min/max codes then land on the same 16 values
  (up to the bfloat16 rounding of scale and zero point);
  every other layer and the LM head on the per-channel int8 kernel (:mod:`tiermem.weights.quant`). Q4_0 and Q4_K
  are 4-bit too, but their codes need not reach both ends of the block (Q4_0 is symmetric, Q4_K's scales are
  searched), so a min/max re-coding adds a second rounding: measured on Gemma3-270M's Q4_K layers, +5.3%
  perplexity against -0.1% in int8;
- KV rows in **int8** (per-token scales, :mod:`tiermem.kvstore.quant`), which every policy reads without widening.

Measured (BENCHMARKS.md, "Fast by default"): perplexity within 1% of float32 on SmolLM2 (Q4_1: int4 weights) and
Gemma3-270M (Q4_K_M: int8 weights).
"""

from __future__ import annotations

import argparse
import json
import re
from functools import cache
from pathlib import Path

from tiermem.staging import staged_file

PRESETS = ("fast", "exact")
EXACT_INT4_TYPES = frozenset({"Q4_1"})  # GGUF types that int4 in groups of 32 re-codes exactly (module docstring)
GGUF_TYPES_FILE = "tiermem-gguf-types.json"  # written beside a converted GGUF: {gguf tensor name: type name}
# GGUF tensor names of a decoder layer's Linear weights -> the module path in transformers' Llama/Gemma3/Qwen models.
GGUF_LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16 or AMX-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", text) is not None


def apply_preset(args: argparse.Namespace) -> None:
    """Fill ``args.dtype``, ``args.weights_quant`` and ``args.kv_dtype`` left unset (None) from ``args.formats``.

    ``weights_quant`` becomes ``auto`` under ``fast`` (resolved per layer at load, :func:`weight_modes`), and
    ``none`` when the weights are not resident (streamed or flash layers are read as stored).
    """
    fast = getattr(args, "formats", "exact") == "fast" and cpu_has_bf16()
    dtype_given = args.dtype is not None
    if args.dtype is None:
        args.dtype = "bfloat16" if fast else "float32"
    if args.weights_quant is None:
        resident = getattr(args, "weights", "resident") == "resident"
        args.weights_quant = "auto" if fast and resident and args.dtype == "bfloat16" else "none"
    if getattr(args, "kv_dtype", "auto") is None:
        args.kv_dtype = "int8" if fast and (not dtype_given or args.dtype == "bfloat16") else "auto"


def gguf_tensor_types(gguf: Path) -> dict[str, str]:
    """{tensor name: GGML type name} of a GGUF file's tensor table (reads the header, not the data)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(gguf)).tensors}


def save_gguf_types(gguf: Path, folder: Path) -> None:
    """Record ``gguf``'s tensor types in its converted ``folder`` (the folder's weights are dequantized floats)."""
    with staged_file(folder / GGUF_TYPES_FILE) as partial:
        partial.write_text(json.dumps(gguf_tensor_types(gguf), indent=0, sort_keys=True))


def source_types(folder: Path) -> dict[str, str] | None:
    """The GGUF tensor types a converted model folder came from; None for a float checkpoint."""
    path = folder / GGUF_TYPES_FILE
    if not path.is_file():
        return None
    types = json.loads(path.read_text())
    if not isinstance(types, dict):
        return None
    return {str(k): str(v) for k, v in types.items()}


def weight_modes(types: dict[str, str] | None) -> dict[str, str]:
    """{module path under ``model.layers`` (``"3.mlp.down_proj"``): ``"int4"``} for each decoder Linear whose GGUF
    type int4 in groups of 32 re-codes exactly (Q4_1); every Linear not named here gets int8 (:func:`quantize_weights`'s
    ``per_module``)."""
    modes: dict[str, str] = {}
    for name, kind in (types or {}).items():
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if match and match.group(2) in GGUF_LINEAR_NAMES and kind in EXACT_INT4_TYPES:
            modes[f"{match.group(1)}.{GGUF_LINEAR_NAMES[match.group(2)]}"] = "int4"
    return modes
