"""``tiermem bench`` for a base model: the same sweep, stopped where the model starts its own next question.

A base model (Gemma3-270M has no chat template) reads the suite as a completion, ``...\\n\\nQuestion: ...\\nAnswer:``
(:mod:`tiermem.prompts`), and after its answer goes on with another ``Question:`` of its own until the task's RULER
generation length runs out (up to 128 tokens at about a second each on one loaded core). This runs
:func:`tiermem.bench.runner.run_bench` with one change, a stop string ``"\\nQuestion:"``; everything else is ``tiermem
bench``'s (RULER's tokens to generate per task, scoring, resumable ``results.jsonl``, tables). Scores are recall of the
expected strings in the text, so cutting the text there can only lower a score, never raise it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/base_model_suite.py --policies "full;auto:compression_ratio=0.875" \\
        --question-aware --lengths 4k --out bench-out/suite-gemma3-4k-qaware

Policies are separated by ``;`` (a spec's own options use commas). Budget-taking policies run at
``--compression-ratio`` (default 0.875, 8x).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tiermem.bench.report import write_report
from tiermem.bench.ruler import SUITES
from tiermem.bench.runner import BenchConfig, run_bench
from tiermem.engine import GenerationConfig
from tiermem.units import parse_tokens

STOP = "\nQuestion:"  # the completion prompt style's own question label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--policies", default="full", help="';'-separated policy specs")
    parser.add_argument("--compression-ratio", type=float, default=0.875, help="for budget-taking policies")
    parser.add_argument("--lengths", default="4k")
    parser.add_argument("--tasks", default=",".join(SUITES["ruler"]))
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question-aware", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = BenchConfig(
        models=[args.model],
        policies=[p for p in args.policies.split(";") if p],
        compression_ratios=[args.compression_ratio],
        lengths=[parse_tokens(x) for x in args.lengths.split(",")],
        tasks=args.tasks.split(","),
        samples=args.samples,
        seed=args.seed,
        generation=GenerationConfig(stop_strings=(STOP,), question_aware=args.question_aware),
        task_new_tokens=True,
    )
    rows = run_bench(config, Path(args.out))
    for path in write_report(rows, Path(args.out)):
        print(path)


if __name__ == "__main__":
    main()
