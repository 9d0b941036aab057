r"""The same sweep run locally and as Ray tasks (``tiermem bench --ray``): identical rows, wall time, overhead per task.

Default sweep: SmolLM2-135M-Instruct, passkey retrieval, 3 policies (full, snapkv, streaming at a 256-token budget)
x 2 lengths (1k, 2k) x 5 depths = 30 rows, 10 Ray tasks (one per sample). The local run is one process with one
torch thread; the Ray run is a local Ray on the loopback with 2 CPUs, so 2 tasks run at once, one torch thread each.

Reported:
- rows that differ between the two runs beyond timings and process RSS (must be 0);
- wall time of each run and their ratio; Ray's start-up (``ray.init``) apart;
- overhead: wall x workers - the seconds the rows spent in prefill and decode, per task (model loads, worker
  start-up, prompt building, scheduling); the same for the local run (per sample), so the two compare;
- the round trip of an empty Ray task (scheduling alone), and a fresh worker's first task (importing tiermem and
  loading the model: paid once per worker process; ``--cold-start-only`` measures just that).

On a shared 2-core machine no speedup is expected: Ray's 2 workers compete with each other and with whatever else
runs (the load average is printed). Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_sweep.py --out bench-out/ray-sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tiermem.bench.ray_runner import comparable, run_bench_ray
from tiermem.bench.runner import BenchConfig, row_key, run_bench
from tiermem.raycluster import connect, disconnect


def sweep(model: str, lengths: list[int]) -> BenchConfig:
    return BenchConfig(
        models=[model],
        policies=["full", "snapkv", "streaming"],
        budgets=[256],
        lengths=lengths,
        depths=[0.1, 0.3, 0.5, 0.7, 0.9],
        tasks=["passkey"],
    )


def busy_seconds(rows: list[dict[str, Any]]) -> float:
    return sum(r.get("prefill_seconds", 0.0) + r.get("decode_seconds", 0.0) for r in rows)


def empty_task_seconds(count: int = 50) -> float:
    """Mean round trip of an empty Ray task once workers are up (submit, schedule, run, fetch)."""
    import ray

    @ray.remote(num_cpus=1)
    def nothing() -> None:
        return None

    ray.get([nothing.remote() for _ in range(4)])  # workers started
    start = time.perf_counter()
    for _ in range(count):
        ray.get(nothing.remote())
    return (time.perf_counter() - start) / count


def cold_start_seconds(model: str) -> dict[str, float]:
    """What a fresh worker pays before its first sample: the round trip of a task in a new worker process
    (``max_calls=1``) that imports tiermem and loads the model, and the load alone inside it."""
    import ray

    @ray.remote(num_cpus=1, max_calls=1)
    def first_task(name: str) -> float:
        begin = time.perf_counter()
        from tiermem.models import load

        load(name)
        return time.perf_counter() - begin

    start = time.perf_counter()
    inside = ray.get(first_task.remote(model))
    return {"fresh_worker_first_task_s": round(time.perf_counter() - start, 2), "import_and_load_s": round(inside, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--out", type=Path, default=Path("bench-out/ray-sweep"))
    parser.add_argument("--cold-start-only", action="store_true", help="measure a fresh worker's first task only")
    args = parser.parse_args()
    if args.cold_start_only:
        cluster = connect(None, num_cpus=2)
        try:
            print(json.dumps(cold_start_seconds(args.model) | {"load_average": os.getloadavg()}))
        finally:
            disconnect(cluster)
        return
    config = sweep(args.model, [int(x) for x in args.lengths.split(",")])
    for sub in ("local", "ray"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    load = os.getloadavg()

    start = time.perf_counter()
    local = run_bench(config, args.out / "local")
    local_wall = time.perf_counter() - start

    start = time.perf_counter()
    cluster = connect(None, num_cpus=2)
    init_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        remote = run_bench_ray(config, args.out / "ray")
        ray_wall = time.perf_counter() - start
        empty = empty_task_seconds()
        cold = cold_start_seconds(args.model)
    finally:
        disconnect(cluster)

    mine, theirs = ({row_key(r): comparable(r) for r in rows} for rows in (local, remote))
    differ = sum(mine[k] != theirs.get(k) for k in mine)
    samples = len(local) // len({r["policy_label"] for r in local})
    result = {
        "rows": len(local),
        "ray_tasks": samples,
        "rows_differing": differ,
        "correct_local": sum(bool(r.get("correct")) for r in local),
        "correct_ray": sum(bool(r.get("correct")) for r in remote),
        "local_wall_s": round(local_wall, 1),
        "ray_init_s": round(init_s, 1),
        "ray_wall_s": round(ray_wall, 1),
        "ratio_ray_over_local": round(ray_wall / local_wall, 2),
        "ratio_with_init": round((ray_wall + init_s) / local_wall, 2),
        "local_busy_s": round(busy_seconds(local), 1),
        "ray_busy_s": round(busy_seconds(remote), 1),
        "local_overhead_per_sample_s": round((local_wall - busy_seconds(local)) / samples, 2),
        "ray_overhead_per_task_s": round((ray_wall * 2 - busy_seconds(remote)) / samples, 2),
        "empty_task_round_trip_ms": round(empty * 1e3, 2),
        **cold,
        "load_average_at_start": [round(x, 1) for x in load],
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=1))
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
