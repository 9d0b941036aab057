"""Choose ZO settings for a small model without looking at the test set: a dev split, the loss curve, keep-best.

``polarity-k16`` trains on 16 sentences per class and tests on a fixed 50 per class; the 34 remaining sentences per
class of the same pool (those ``polarity-k50`` adds) are never used by it, so they serve as a dev set here (68
sentences, disjoint from both train and test). One run: train with ``tiermem.tune``'s own runner, evaluate dev
accuracy/loss every ``--eval-every`` steps and, with ``--keep-best``, keep the trained tensors of the best dev
evaluation (accuracy, then loss; MeZO's trainer also selects its checkpoint on a validation set); the test set is
evaluated once, at the end, on the kept tensors, with ``--test``. ``--schedule linear`` decays the lr linearly to 0
over ``--steps`` (MeZO itself uses a constant lr, the default). One JSON line per run is appended to ``--out``;
``--table`` prints the runs of that file as a markdown table instead of training.

A learning-rate grid without touching the test set: run each grid point with ``--save-trained`` (no ``--test``), pick
on dev, then ``--test-run RUN_ID`` evaluates the test set once on the chosen run's saved tensors and adds it to its
line; ``--test-best TAG`` does that for the dev-best run of each method among the runs tagged TAG.

    OMP_NUM_THREADS=1 .venv/bin/python -u benchmarks/tune_probe.py --method zo-lora --lr 2e-3 --eps 1e-2 \
        --steps 200 --batch-size 8 --eval-every 20 --keep-best --test --out bench-out/tune-probe/probes.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tiermem.stats import peak_rss_bytes, reset_peak_rss
from tiermem.tune.config import TuneConfig
from tiermem.tune.objective import Objective, batch_indices
from tiermem.tune.select import KeepBest, scheduled_lr, set_lr
from tiermem.tune.tasks import load_task, polarity_split
from tiermem.tune.trainer import _make_runner


def dev_split(k: int) -> tuple[Any, ...]:
    """The pool sentences ``polarity-k{k}`` leaves unused: neither its training set nor the test set."""
    train_k, test = polarity_split(k)
    pool, _ = polarity_split(50)
    used = {e.text for e in train_k} | {e.text for e in test}
    return tuple(e for e in pool if e.text not in used)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="zo-lora")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eps", type=float)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zo-queries", type=int, default=1, help="n-SPSA directions per ZO step (MeZO: 1)")
    parser.add_argument("--zo-noise", default="gaussian", help="gaussian (MeZO's) or table (shared noise table)")
    parser.add_argument("--zo-sparsity", type=float, default=0.0, help="ZO-Bench's gradient sparsity (fixed mask)")
    parser.add_argument("--schedule", choices=["constant", "linear"], default="constant")
    parser.add_argument("--eval-every", type=int, default=0, help="dev evaluation every N steps (0: end only)")
    parser.add_argument("--keep-best", action="store_true", help="end on the best dev evaluation's tensors")
    parser.add_argument("--no-dev", action="store_true", help="skip the dev evaluations")
    parser.add_argument("--test", action="store_true", help="evaluate the test set after training")
    parser.add_argument("--test-before", action="store_true", help="and before (the zero-shot model: same every run)")
    parser.add_argument("--tag", default="", help="a label stored with the run (e.g. the suite it belongs to)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/tune-probe/probes.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the runs in --out as a table and exit")
    parser.add_argument("--save-trained", action="store_true", help="save the final/kept trained tensors")
    parser.add_argument("--test-run", help="evaluate the test set on the saved tensors of this run id, and exit")
    parser.add_argument("--test-best", help="per method of the runs with this tag: test the dev-best saved run")
    return parser.parse_args()


def run_id(r: dict[str, Any]) -> str:
    lora = "-lora" if r["lora"] and not r["method"].endswith("lora") else ""
    best = "-best" if r.get("keep_best") else ""
    queries = f"-q{r['zo_queries']}" if r.get("zo_queries", 1) != 1 else ""  # n = 1 ids stay as before n-SPSA
    queries += "-table" if r.get("zo_noise", "gaussian") == "table" else ""
    queries += f"-sp{r['zo_sparsity']:g}" if r.get("zo_sparsity") else ""
    return (
        f"{r.get('tag') or 'run'}-{r['method']}{lora}-lr{r['lr']:g}-eps{r['eps']}{queries}"
        f"-{r['steps']}x{r['batch_size']}"
        f"-{r.get('schedule', 'constant')}{best}-s{r['seed']}"
    )


def dev_best(out: Path, tag: str) -> list[str]:
    """The run id of the dev-best saved run per (method, LoRA) among the runs tagged ``tag`` (accuracy, then loss)."""
    from tiermem.tune.select import score

    best: dict[tuple[str, bool], dict[str, Any]] = {}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if r.get("tag") != tag or not r.get("saved") or not r.get("dev"):
            continue
        r["chosen_on"] = r.get("kept") or r["dev"][-1]
        key = (r["method"], r["lora"])
        if key not in best or score(r["chosen_on"]) > score(best[key]["chosen_on"]):
            best[key] = r
    return [r["run_id"] for r in best.values()]


def test_saved(out: Path, wanted: str) -> dict[str, Any]:
    """Evaluate the test set once on a saved run's tensors and write it into that run's line of ``out``."""
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    matches = [i for i, r in enumerate(records) if r.get("run_id") == wanted and r.get("saved")]
    if not matches:
        raise SystemExit(f"no saved run {wanted} in {out}")
    r = records[matches[-1]]
    lora = r["lora"] and r["method"] not in ("zo-lora", "lora")
    config = TuneConfig(method=r["method"], lora=lora, lr=r["lr"], steps=0, seed=r["seed"])
    task = load_task(config.task)
    runner, _ = _make_runner(config, lambda tok: Objective(task, tok))
    saved = load_file(r["saved"])
    with torch.no_grad():
        for name, p in runner.named:  # type: ignore[attr-defined]
            p.copy_(saved[name])
    r["test_after"] = runner.evaluate()
    runner.close()
    lines[matches[-1]] = json.dumps(r)
    out.write_text("\n".join(lines) + "\n")
    return r


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = TuneConfig(
        method=args.method,
        lora=args.lora,
        lr=args.lr,
        eps=args.eps,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        save_model=False,
        zo_queries=args.zo_queries,
        zo_noise=args.zo_noise,
        zo_sparsity=args.zo_sparsity,
    )
    config.validate()
    task = load_task(config.task)
    dev_task = replace(task, name=task.name + "-dev", test=dev_split(16))
    runner, objective = _make_runner(config, lambda tok: Objective(task, tok))
    dev = Objective(dev_task, objective.tokenizer)
    base_lr = float(config.settings()["lr"])  # type: ignore[arg-type]
    keep = KeepBest()
    live = dict(runner.named)  # type: ignore[attr-defined]

    def dev_eval(step: int) -> dict[str, float]:
        runner.model.eval()  # type: ignore[attr-defined]
        began = time.perf_counter()
        result = {"step": step, **dev.evaluate(runner.model, 16)}  # type: ignore[attr-defined]
        print(f"step {step}: dev {result} ({time.perf_counter() - began:.0f}s)", flush=True)
        if args.keep_best:
            keep.observe(step, result, live)
        return result

    record: dict[str, Any] = {
        "tag": args.tag,
        "method": config.method,
        "lora": config.uses_lora,
        "lr": base_lr,
        "eps": config.settings()["eps"],
        "schedule": args.schedule,
        "zo_queries": config.zo_queries,
        "zo_noise": config.zo_noise,
        "zo_sparsity": config.zo_sparsity,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "keep_best": args.keep_best,
        "eval_every": args.eval_every,
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
        set_lr(runner, scheduled_lr(base_lr, args.schedule, step, config.steps))
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
    record["peak_rss_bytes"] = peak_rss_bytes()  # training only: before the dev snapshots' evaluations end
    if not args.no_dev:
        dev_curve.append(dev_eval(config.steps))
    if args.keep_best and keep.best is not None:
        keep.restore(live)
        record["kept"] = keep.best
    record.update(
        losses=losses,
        projected_grads=grads,
        seconds_per_step=sum(seconds) / max(len(seconds), 1),
        cpu_seconds_per_step=sum(cpu) / max(len(cpu), 1),
        dev=dev_curve,
        train_loss_first20=sum(losses[:20]) / max(len(losses[:20]), 1),
        train_loss_last20=sum(losses[-20:]) / max(len(losses[-20:]), 1),
    )
    record["run_id"] = run_id(record)
    if args.save_trained:
        path = args.out.parent / "trained" / f"{record['run_id']}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: p.contiguous() for name, p in runner.named}, str(path))  # type: ignore[attr-defined]
        record["saved"] = str(path)
    if args.test:
        record["test_after"] = runner.evaluate()
        print(f"test after: {record['test_after']}", flush=True)
    runner.close()
    return record


def table(path: Path) -> str:
    """One row per run in ``path``: settings, dev (kept or last), test, CPU s/step, peak RSS."""
    lines = [
        "| tag | method | lr / eps | n | schedule | steps x batch | kept step | dev acc. / loss | test acc. "
        "| test loss | CPU s/step | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        last = r["kept"] if r.get("kept") else (r["dev"][-1] if r.get("dev") else None)
        dev = f"{last['accuracy']:.2f} / {last['loss']:.3f}" if last else "-"
        kept = str(last["step"]) if r.get("kept") else "last"
        test = r.get("test_after")
        method = r["method"] + (" (LoRA)" if r["lora"] and not r["method"].endswith("lora") else "")
        eps = f"{r['eps']:g}" if r.get("eps") is not None else "-"
        scored = f"| {test['accuracy']:.2f} | {test['loss']:.3f} " if test else "| - | - "
        lines.append(
            f"| {r.get('tag', '')} | {method} | {r['lr']:g} / {eps} | {r.get('zo_queries', 1)} "
            f"| {r.get('schedule', 'constant')} "
            f"| {r['steps']} x {r['batch_size']} | {kept} | {dev} {scored}"
            f"| {r['cpu_seconds_per_step']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse()
    if args.table:
        print(table(args.out))
        return
    wanted = [args.test_run] if args.test_run else dev_best(args.out, args.test_best) if args.test_best else []
    for chosen_id in wanted:
        chosen = test_saved(args.out, chosen_id)
        print(f"{chosen_id}: test {chosen['test_after']}", flush=True)
    if args.test_run or args.test_best:
        return
    save_record(args.out, run(args))


def save_record(out: Path, record: dict[str, Any]) -> None:
    """Append one run's line to ``out`` and print it without its per-step curves."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("losses", "projected_grads")}), flush=True)


if __name__ == "__main__":
    main()
