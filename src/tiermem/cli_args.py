"""Argument groups shared by ``tiermem generate`` and ``tiermem bench``, and the configuration tree they build.

Each flag is defined once here; ``choices=`` come from the tables that validate the values (``models.DTYPES``,
``prompts.STYLES``, ``kvstore.blocks.STORE_CHOICES``, ``kvstore.ALLOCATORS``). Tables are imported inside the
functions, so importing this module stays cheap and cycle-free (it imports no command module).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tiermem.units import parse_size, parse_tokens

if TYPE_CHECKING:
    from tiermem.engine import GenerationConfig


def add_dtype_arg(parser: argparse.ArgumentParser, preset: str = "fast") -> None:
    """The number formats: ``--formats`` (a preset, default ``preset``), and the parts it sets unless given:
    ``--dtype`` (weights and activations), ``--weights-quant`` with ``--quant-group``, and ``--kv-dtype`` (how KV
    rows are stored). :func:`tiermem.formats.apply_preset` fills the parts after parsing."""
    from tiermem.formats import PRESETS
    from tiermem.kvstore.quant import KV_DTYPES
    from tiermem.models import DTYPES
    from tiermem.weights.quant import DEFAULT_INT4_GROUP, INT4_GROUP_SIZES, WEIGHT_QUANTS

    parser.add_argument(
        "--formats",
        default=preset,
        choices=list(PRESETS),
        help=f"number formats (default {preset}): fast = bf16 + weights in the checkpoint's bits + int8 KV "
        "where the CPU has bf16; exact = float32 as loaded",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), help="weight and activation dtype (default: --formats)")
    parser.add_argument(
        "--weights-quant", choices=list(WEIGHT_QUANTS), help="weight-only quantized Linear layers (default: --formats)"
    )
    parser.add_argument(
        "--quant-group", type=int, default=DEFAULT_INT4_GROUP, choices=list(INT4_GROUP_SIZES), help="int4 group size"
    )
    parser.add_argument("--kv-dtype", choices=list(KV_DTYPES), help="KV storage (default: --formats; auto: --dtype)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`tiermem.models.load` that :func:`add_dtype_arg`'s flags give."""
    return {"dtype": args.dtype, "weights_quant": args.weights_quant, "quant_group": args.quant_group}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--dtype``."""
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, a local HF folder or a .gguf file")
    add_dtype_arg(parser)


def add_policy_args(parser: argparse.ArgumentParser, compressed: str = "the context") -> None:
    """``--policy`` (default auto), its budget (``--kv-budget`` or ``--compression-ratio``) and ``--policy-opt``;
    ``compressed`` names what a compression ratio applies to, in the help."""
    parser.add_argument(
        "--policy",
        default="auto",
        help="policy name (default auto: the best measured), with options: snapkv:window_size=64",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--kv-budget", type=parse_tokens, help="KV tokens kept per layer (e.g. 512)")
    budget.add_argument("--compression-ratio", type=float, help=f"fraction of {compressed} removed (kvpress style)")
    parser.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE", help="a policy field")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    """The flags of :class:`GenerationConfig` and its :class:`StoreConfig`, plus the prompt style
    (``max_new_tokens=None``: the command picks a default per task)."""
    from tiermem.decode_step import DECODE_STEPS
    from tiermem.kvstore import ALLOCATORS
    from tiermem.kvstore.blocks import STORE_CHOICES
    from tiermem.prompts import STYLES

    more = "" if max_new_tokens is not None else " (default: each task's own, RULER's for suite tasks)"
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens generated at most" + more)
    parser.add_argument("--chunk-size", type=parse_tokens, default=512, help="prefill chunk size in tokens")
    parser.add_argument("--question-aware", action="store_true", help="compress context and question together")
    parser.add_argument("--prompt-style", default="auto", choices=list(STYLES))
    parser.add_argument("--kv-memory", type=parse_size, help="KV bytes held in RAM at most, e.g. 512MB (rest on disk)")
    parser.add_argument("--kv-store", default="auto", choices=list(STORE_CHOICES), help="where evicted blocks live")
    parser.add_argument("--kv-dir", help="folder for the disk store's temporary files (default: system temp)")
    parser.add_argument("--kv-alloc", default="grow", choices=list(ALLOCATORS), help="KV buffer memory")
    parser.add_argument(
        "--decode-step",
        default="auto",
        choices=list(DECODE_STEPS),
        help="auto: one compiled call per token where the model and policy allow it; python: tiermem's Python step",
    )


def generation_config(args: argparse.Namespace, **fields: Any) -> GenerationConfig:
    """The :class:`GenerationConfig` (with its :class:`StoreConfig`) the shared flags describe; ``fields`` set or
    override the others (``generate``'s temperature, top_p, seed and stop strings)."""
    from tiermem.engine import GenerationConfig
    from tiermem.kvstore.blocks import StoreConfig

    kv_dtype = getattr(args, "kv_dtype", "auto")
    store = StoreConfig(backend=args.kv_store, folder=args.kv_dir, allocator=args.kv_alloc, kv_dtype=kv_dtype)
    values: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "chunk_size": args.chunk_size,
        "question_aware": args.question_aware,
        "kv_memory": args.kv_memory,
        "store": store,
        "decode_step": getattr(args, "decode_step", "auto"),
    }
    return GenerationConfig(**(values | fields))
