"""MeZO, the ZO-Bench optimizers and backprop baselines side by side on a real classification task.

Each run is ``tiermem tune ... --json`` in its own subprocess (so its peak RSS is its own), with the same task,
batch size, number of steps and seed; the table gives accuracy before and after, the training loss of the last
steps, seconds per step and peak RSS during training beside one forward pass's peak (inference) in the same process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_compare.py --steps 30 --batch-size 8 --out bench-out/tune

Runs whose row is already in ``<out>/rows.jsonl`` are not repeated (delete the file to measure again). Times on a
shared, loaded machine are not speed claims; the accuracy and memory columns are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# (label, tiermem tune arguments). Zero-shot is a run of 0 steps: only the evaluation.
BASELINE = [
    ("zero-shot", ["--method", "zo-sgd", "--steps", "0"]),
    ("MeZO full (zo-sgd)", ["--method", "zo-sgd"]),
    ("MeZO LoRA (zo-lora)", ["--method", "zo-lora"]),
    ("LoRA backprop (AdamW)", ["--method", "lora"]),
    ("full backprop (AdamW)", ["--method", "adamw"]),
]
ZO_BENCH = [  # ZO-Bench's four optimizers on the same LoRA parameters and budget of forward passes
    ("ZO-SGD (LoRA)", ["--method", "zo-sgd", "--lora"]),
    ("ZO-SGD-Sign (LoRA)", ["--method", "zo-sgd-sign", "--lora"]),
    ("ZO-SGD-MMT (LoRA)", ["--method", "zo-sgd-mmt", "--lora"]),
    ("ZO-Adam (LoRA)", ["--method", "zo-adam", "--lora"]),
]
SUITES = {"baseline": BASELINE, "zo-bench": ZO_BENCH, "all": BASELINE + ZO_BENCH}


def run_one(label: str, extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    steps = [] if "--steps" in extra else ["--steps", str(args.steps)]
    command = [
        sys.executable,
        "-m",
        "tiermem.cli",
        "tune",
        "--model",
        args.model,
        "--task",
        args.task,
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--json",
        *steps,
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"label": label, "error": tail[0], "command": " ".join(command[2:])}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record.update(label=label, command="tiermem tune " + " ".join(command[4:]))
    return record


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | steps | lr | eps | trained params | acc. before | acc. after | last-5 train loss "
        "| s/step | peak RSS (MiB) | inference peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} |")
            continue
        losses = r.get("losses") or []
        last = f"{sum(losses[-5:]) / len(losses[-5:]):.3f}" if losses else "-"
        eps = f"{r['eps']:g}" if r.get("eps") is not None else "-"
        seconds = f"{r['seconds_per_step']:.1f}" if r["steps"] else "-"
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['lr']:g} | {eps} | {r['trained_parameters'] / 1e6:.2f}M "
            f"| {r['accuracy_before']:.2f} | {r['accuracy_after']:.2f} | {last} | {seconds} "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} | {r['inference_peak_rss_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy after tuning against peak RSS during training, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in good:
        ax.scatter(r["peak_rss_bytes"] / 2**20, r["accuracy_after"] * 100)
        ax.annotate(r["label"], (r["peak_rss_bytes"] / 2**20, r["accuracy_after"] * 100), fontsize=7)
    ax.set_xlabel("peak RSS while training (MiB)")
    ax.set_ylabel("test accuracy after tuning (%)")
    ax.set_title("accuracy against memory")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="polarity-k16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suite", choices=list(SUITES), default="all")
    parser.add_argument("--only", help="comma-separated labels to run (default: the whole suite)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/tune"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "rows.jsonl"
    done = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            row = json.loads(line)
            done[(row["label"], row.get("steps"), row.get("batch_size"), row.get("task"))] = row
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    for label, extra in SUITES[args.suite]:
        if wanted is not None and label not in wanted:
            continue
        steps = 0 if "--steps" in extra else args.steps
        key = (label, steps, args.batch_size, args.task)
        if key in done:
            rows.append(done[key])
            continue
        print(f"running {label} ...", file=sys.stderr, flush=True)
        row = run_one(label, extra, args)
        rows.append(row)
        if "error" not in row:
            with rows_file.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    plot(rows, args.out / "accuracy_vs_memory.png")
    print(text)


if __name__ == "__main__":
    main()
