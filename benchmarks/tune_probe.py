"""Choose a ZO learning rate for a small model without looking at the test set: a dev split and the loss curve.

``polarity-k16`` trains on 16 sentences per class and tests on a fixed 50 per class; the 34 remaining sentences per
class of the same pool (those ``polarity-k50`` adds) are never used by it, so they serve as a dev set here (68
sentences, disjoint from both train and test). One run: train with ``tiermem.tune``'s own runner, evaluate dev
accuracy/loss every ``--eval-every`` steps, and the test set only at the end with ``--test`` (after the settings are
chosen). One JSON line per run is appended to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_probe.py --method zo-lora --lr 1e-3 --eps 1e-2 \
        --steps 100 --batch-size 16 --eval-every 50 --out bench-out/tune-probe/probes.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tiermem.stats import peak_rss_bytes, reset_peak_rss
from tiermem.tune.config import TuneConfig
from tiermem.tune.objective import Objective, batch_indices
from tiermem.tune.tasks import load_task, polarity_split
from tiermem.tune.trainer import _make_runner


def dev_split(k: int) -> tuple[Any, ...]:
    """The pool sentences ``polarity-k{k}`` leaves unused: neither its training set nor the test set."""
    train_k, test = polarity_split(k)
    pool, _ = polarity_split(50)
    used = {e.text for e in train_k} | {e.text for e in test}
    return tuple(e for e in pool if e.text not in used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="zo-lora")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eps", type=float)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="dev evaluation every N steps (0: end only)")
    parser.add_argument("--no-dev", action="store_true", help="skip the dev evaluations")
    parser.add_argument("--test", action="store_true", help="evaluate the test set after training")
    parser.add_argument("--test-before", action="store_true", help="and before (the zero-shot model: same every run)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/tune-probe/probes.jsonl"))
    args = parser.parse_args()
    config = TuneConfig(
        method=args.method,
        lora=args.lora,
        lr=args.lr,
        eps=args.eps,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        save_model=False,
    )
    config.validate()
    task = load_task(config.task)
    dev_task = replace(task, name=task.name + "-dev", test=dev_split(16))
    runner, objective = _make_runner(config, lambda tok: Objective(task, tok))
    dev = Objective(dev_task, objective.tokenizer)

    def dev_eval(step: int) -> dict[str, float]:
        runner.model.eval()  # type: ignore[attr-defined]
        began = time.perf_counter()
        result = dev.evaluate(runner.model, 16)  # type: ignore[attr-defined]
        print(f"step {step}: dev {result} ({time.perf_counter() - began:.0f}s)", flush=True)
        return {"step": step, **result}

    record: dict[str, Any] = {
        "method": config.method,
        "lora": config.uses_lora,
        "lr": config.settings()["lr"],
        "eps": config.settings()["eps"],
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "trained_parameters": runner.trained_parameters,
        "dev_size": len(dev_task.test),
    }
    if args.test_before:
        record["test_before"] = runner.evaluate()
    dev_curve = [] if args.no_dev or args.eval_every == 0 else [dev_eval(0)]
    losses, seconds, cpu = [], [], []
    grads: list[float] = []
    reset_peak_rss()
    for step in range(config.steps):
        picked = batch_indices(len(task.train), config.batch_size, step, config.seed)
        batch = objective.batch([task.train[i] for i in picked])
        began, began_cpu = time.perf_counter(), time.process_time()
        out = runner.train_step(step, batch)
        seconds.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)  # this process's CPU time: what a step costs, load aside
        losses.append(out["loss"])
        grads.append(out.get("projected_grad", 0.0))
        if (step + 1) % 10 == 0:
            recent = sum(losses[-10:]) / 10
            g = sum(abs(x) for x in grads[-10:]) / 10
            print(
                f"step {step + 1}: train loss (last 10) {recent:.4f} |g| {g:.3f} "
                f"{seconds[-1]:.1f}s wall {cpu[-1]:.2f}s cpu/step",
                flush=True,
            )
        if not args.no_dev and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < config.steps:
            dev_curve.append(dev_eval(step + 1))
    record["peak_rss_bytes"] = peak_rss_bytes()
    if not args.no_dev:
        dev_curve.append(dev_eval(config.steps))
    record.update(
        losses=losses,
        projected_grads=grads,
        seconds_per_step=sum(seconds) / max(len(seconds), 1),
        cpu_seconds_per_step=sum(cpu) / max(len(cpu), 1),
        dev=dev_curve,
        train_loss_first20=sum(losses[:20]) / max(len(losses[:20]), 1),
        train_loss_last20=sum(losses[-20:]) / max(len(losses[-20:]), 1),
    )
    if args.test:
        record["test_after"] = runner.evaluate()
        print(f"test after: {record['test_after']}", flush=True)
    runner.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
