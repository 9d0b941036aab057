"""``tiermem bench``: arguments and entry point."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tiermem.cli_args import add_dtype_arg, add_generation_args, generation_config
from tiermem.units import parse_tokens


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


def tokens_list(text: str) -> list[int]:
    return [parse_tokens(item) for item in _split(text)]


def floats(text: str) -> list[float]:
    try:
        return [float(item) for item in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def add_bench_parser(sub: Any) -> None:
    from tiermem.bench.ruler import ALL_TASKS, SUITES

    bench = sub.add_parser("bench", help="sweep policies over long-context tasks; tables and plots")
    bench.add_argument("--models", type=_split, default=["smollm2"], help="comma-separated models")
    add_dtype_arg(bench)
    bench.add_argument(
        "--policies", type=split_specs, default=["full", "streaming", "snapkv"], help="policy specs, e.g. full,snapkv"
    )
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument("--budgets", type=tokens_list, help="KV budgets in tokens, e.g. 256,512,1k (default 512)")
    budget.add_argument(
        "--compression-ratios", type=floats, help="fractions of the context removed, e.g. 0.5,0.75 (kvpress style)"
    )
    bench.add_argument("--lengths", type=tokens_list, default=[2048], help="prompt lengths, e.g. 4k,8k,128k")
    bench.add_argument("--depths", type=floats, default=[0.1, 0.5, 0.9], help="needle depths in [0, 1] (classic tasks)")
    tasks = bench.add_mutually_exclusive_group()
    tasks.add_argument("--suite", choices=list(SUITES), help="a named task set: ruler (10 RULER-style tasks), classic")
    tasks.add_argument("--tasks", type=_split, help=f"comma-separated tasks: {', '.join(ALL_TASKS)}")
    bench.add_argument("--samples", type=int, default=1, help="samples per (task, length, depth)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the samples")
    add_generation_args(bench, max_new_tokens=None)
    bench.add_argument("--out", default="bench-out", help="output folder (results.jsonl is appended, resumable)")
    bench.add_argument("--report-only", action="store_true", help="rewrite tables and plots from results.jsonl")
    bench.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="one Ray task per sample on the cluster at ADDRESS (host:port, auto); alone: a local Ray, 2 CPUs",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from tiermem.bench.report import write_report
    from tiermem.bench.ruler import SUITES
    from tiermem.bench.runner import BenchConfig, load_rows, run_bench
    from tiermem.errors import TiermemError

    out = Path(args.out)
    if args.report_only:
        rows = load_rows(out)
        if not rows:
            raise TiermemError(f"no results in {out}")
    else:
        # Without --max-new-tokens every task generates its own number of tokens (RULER's per task).
        per_task = args.max_new_tokens is None
        placeholder = {"max_new_tokens": BenchConfig().generation.max_new_tokens} if per_task else {}
        config = BenchConfig(
            models=args.models,
            policies=args.policies,
            budgets=args.budgets or [512],
            compression_ratios=args.compression_ratios or [],
            lengths=args.lengths,
            depths=args.depths,
            tasks=list(SUITES[args.suite]) if args.suite else args.tasks or ["passkey", "needle"],
            samples=args.samples,
            seed=args.seed,
            dtype=args.dtype,
            weights_quant=args.weights_quant,
            quant_group=args.quant_group,
            prompt_style=args.prompt_style,
            generation=generation_config(args, **placeholder),
            task_new_tokens=per_task,
        )
        if args.ray is not None:
            from tiermem.bench.ray_runner import run_bench_ray

            rows = run_bench_ray(config, out, address=args.ray or None)
        else:
            rows = run_bench(config, out)
    for path in write_report(rows, out):
        print(path)
    return 0
