"""Seconds per ZO step on SmolLM2 by noise source, alternating in one process (this VM drifts between processes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zo_step_time.py --queries 1 --rounds 2 --steps 2

Each round loads the model once per noise source (``gaussian``: MeZO's fresh draw; ``table``: the shared noise
table), times ``--steps`` full-parameter zo-sgd steps on the same batch of ``--batch-size`` polarity-k16 sentences,
then one forward pass alone (what a step's forwards cost); the sources alternate, so drift hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tiermem.tune.config import TuneConfig
from tiermem.tune.objective import Objective, batch_indices
from tiermem.tune.tasks import load_task
from tiermem.tune.trainer import _make_runner


def one(kind: str, args: argparse.Namespace) -> tuple[list[float], float]:
    """(seconds of each step, seconds of one forward) for noise source ``kind``."""
    config = TuneConfig(
        method="zo-sgd", steps=args.steps, batch_size=args.batch_size, lr=3e-5, eps=1e-3, zo_noise=kind,
        zo_queries=args.queries,
    )  # fmt: skip
    task = load_task(config.task)
    runner, objective = _make_runner(config, lambda tok: Objective(task, tok))
    batch = objective.batch([task.train[i] for i in batch_indices(len(task.train), args.batch_size, 0, 0)])
    steps = []
    for step in range(args.steps):
        began = time.perf_counter()
        runner.train_step(step, batch)
        steps.append(time.perf_counter() - began)
    began = time.perf_counter()
    runner.forward_only(batch)
    forward = time.perf_counter() - began
    runner.close()
    return steps, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1, help="n-SPSA directions per step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"gaussian": [], "table": []}
    forwards: dict[str, list[float]] = {"gaussian": [], "table": []}
    for _ in range(args.rounds):
        for kind in times:
            steps, forward = one(kind, args)
            times[kind] += steps
            forwards[kind].append(forward)
            print(f"{kind}: steps {[round(s, 2) for s in steps]} s, one forward {forward:.2f} s", flush=True)
    gaussian = statistics.median(times["gaussian"])
    print(f"| noise | s/step median (n={args.queries}, batch {args.batch_size}) | range | forward | vs gaussian |")
    print("|---|---|---|---|---|")
    for kind, t in times.items():
        median = statistics.median(t)
        print(
            f"| {kind} | {median:.2f} | {min(t):.2f}-{max(t):.2f} | {statistics.median(forwards[kind]):.2f} "
            f"| {gaussian / median:.2f}x faster |"
        )


if __name__ == "__main__":
    main()
