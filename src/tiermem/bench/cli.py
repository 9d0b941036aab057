"""``tiermem bench``: arguments and entry point."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def split_specs(text: str) -> list[str]:
    """``"full,snapkv:window_size=64,kernel_size=7"`` -> ``["full", "snapkv:window_size=64,kernel_size=7"]``."""
    specs: list[str] = []
    for item in _split(text):
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item  # an option of the spec before it
        else:
            specs.append(item)
    return specs


def add_bench_parser(sub: Any) -> None:
    from tiermem.cli import parse_size, parse_tokens

    def tokens_list(text: str) -> list[int]:
        return [parse_tokens(item) for item in _split(text)]

    def floats(text: str) -> list[float]:
        try:
            return [float(item) for item in _split(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None

    bench = sub.add_parser("bench", help="sweep policies over long-context tasks; tables and plots")
    bench.add_argument("--models", type=_split, default=["smollm2"], help="comma-separated models")
    bench.add_argument(
        "--policies", type=split_specs, default=["full", "streaming", "snapkv"], help="policy specs, e.g. full,snapkv"
    )
    bench.add_argument("--budgets", type=tokens_list, default=[512], help="KV budgets in tokens, e.g. 256,512,1k")
    bench.add_argument("--lengths", type=tokens_list, default=[2048], help="prompt lengths, e.g. 2k,4k,8k")
    bench.add_argument("--depths", type=floats, default=[0.1, 0.5, 0.9], help="needle depths in [0, 1]")
    bench.add_argument("--tasks", type=_split, default=["passkey", "needle"], help="passkey, needle, multikey")
    bench.add_argument("--samples", type=int, default=1, help="samples per (task, length, depth)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--max-new-tokens", type=int, default=16)
    bench.add_argument("--chunk-size", type=parse_tokens, default=512)
    bench.add_argument("--question-aware", action="store_true")
    bench.add_argument("--prompt-style", default="auto", choices=["auto", "chat", "completion"])
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--kv-memory", type=parse_size, help="KV bytes in RAM at most, e.g. 512MB (rest on disk)")
    bench.add_argument("--kv-store", default="auto", choices=["auto", "ram", "disk"])
    bench.add_argument("--kv-alloc", default="grow", choices=["grow", "paged", "concat"])
    bench.add_argument("--out", default="bench-out", help="output folder (results.jsonl is appended, resumable)")
    bench.add_argument("--report-only", action="store_true", help="rewrite tables and plots from results.jsonl")


def cmd_bench(args: argparse.Namespace) -> int:
    from tiermem.bench.report import write_report
    from tiermem.bench.runner import BenchConfig, load_rows, run_bench
    from tiermem.errors import TiermemError

    out = Path(args.out)
    if args.report_only:
        rows = load_rows(out)
        if not rows:
            raise TiermemError(f"no results in {out}")
    else:
        config = BenchConfig(
            models=args.models,
            policies=args.policies,
            budgets=args.budgets,
            lengths=args.lengths,
            depths=args.depths,
            tasks=args.tasks,
            samples=args.samples,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            chunk_size=args.chunk_size,
            question_aware=args.question_aware,
            prompt_style=args.prompt_style,
            dtype=args.dtype,
            kv_memory=args.kv_memory,
            kv_store=args.kv_store,
            kv_alloc=args.kv_alloc,
        )
        rows = run_bench(config, out)
    for path in write_report(rows, out):
        print(path)
    return 0
