"""ZO2 on disk at 1.1B: ``tiermem tune --weights stream --weight-memory 1GB`` against the resident ZO run.

Issue 12's acceptance: the 1.1B random-weight checkpoint (``benchmarks/make_random_llama.py --preset 1.1b``)
fine-tuned with ZO-SGD (MeZO, every parameter) under ``--weight-memory 1GB``: peak RSS <= 1.5 GiB, the same loss as
the resident ZO run for the same seed over >= 20 steps, step time <= 1.5x resident's.

    .venv/bin/python benchmarks/make_random_llama.py --preset 1.1b --out bench-out/llama-1.1b-random --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_stream_1b.py --model-dir bench-out/llama-1.1b-random \\
        --steps 20 --out bench-out/tune-stream-1b

Each run is ``tiermem tune ... --json`` in its own process, one after the other (resident, then stream), so the
step-time ratio is taken under the same machine load; the load average is recorded around each run. The task is a
``.jsonl`` file of real labelled sentences (Pang & Lee polarity, the ``polarity-k16`` training split plus 4 test
sentences per class), so the evaluations before and after tuning cost 8 sentences, not 100; the loss is MeZO's
prompt-based classification loss. Peak RSS is reported three ways: tune's own (training only, reset after loading),
the child's ``ru_maxrss`` (after tune's last reset: training and the final evaluation) and the highest ``VmRSS`` the
parent sampled every 0.1 s over the child's whole life (loading and conversion included).

``--crash-at K`` adds a crash run (``--crash-steps`` long, default ``--steps``) in ``run-crash``: the streamed run
killed with SIGKILL in step K+1, half a step in, at the first moment after that when a layer file is being written
(a ``.tmp`` in a generation folder: a torn file beside the last checkpoint), then ``--resume`` to the same step
count. It is compared with the uninterrupted streamed run (``run-stream``, run first or, with ``--order ''``, an
earlier one in ``--out``): every step's loss+, loss- and projected gradient, the final test loss, and the last
checkpoint (each layer file's SHA-256, the pending update). Where the kill landed and the ``.tmp`` files left after
the resumed run are recorded. Issue 12's "a crash mid-step loses at most that step", at 1.1B, in one command:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_stream_1b.py --model-dir bench-out/llama-1.1b-random \
        --steps 4 --order stream --crash-at 2 --out bench-out/tune-stream-1b/crash
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30


def write_task(path: Path) -> Path:
    """polarity-k16's 32 training sentences then 8 of its test sentences: the file task's 80/20 cut splits there."""
    from tiermem.tune.tasks import polarity_split

    train, test = polarity_split(16)
    held = [e for e in test if e.label == 0][:4] + [e for e in test if e.label == 1][:4]
    words = ("terrible", "great")
    lines = [json.dumps({"text": e.text, "label": words[e.label]}) for e in (*train, *held)]
    path.write_text("\n".join(lines) + "\n")
    return path


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_tune(args: argparse.Namespace, task: Path, weights: str, out: Path, **kw: Any) -> dict[str, Any]:
    """One ``tiermem tune --json`` child; returns its JSON plus RSS, wall time, load and the per-step records."""
    command = [sys.executable, "-m", "tiermem.cli", "tune", "--model", str(args.model_dir), "--task", str(task)]
    steps = kw.get("steps", args.steps)
    command += ["--method", "zo-sgd", "--steps", str(steps), "--batch-size", str(args.batch_size)]
    command += ["--lr", str(args.lr), "--eps", str(args.eps), "--seed", str(args.seed), "--dtype", args.dtype]
    command += ["--weights", weights, "--out", str(out), "--no-save-model", "--json", "--zo-noise", args.zo_noise]
    if weights == "stream":
        command += ["--weight-memory", args.weight_memory]
    if kw.get("resume"):
        command.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    load_before = os.getloadavg()
    cpu_before = _children_cpu()
    began = time.perf_counter()
    log = (out.parent / f"{out.name}.stderr").open("w")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    sampled, killed = 0, False
    kill_after = kw.get("kill_after_step")
    killed_at, landed = None, {}
    while child.poll() is None:
        sampled = max(sampled, _rss(child.pid))
        if kill_after is not None and not killed:
            records = _records(out)
            if len(records) >= kill_after:
                landed = _kill_mid_write(child, out, records[-1]["seconds"] / 2)
                killed, killed_at = True, len(_records(out))
        time.sleep(0.1)
    stdout = child.stdout.read() if child.stdout else ""
    wall = time.perf_counter() - began
    log.close()
    row: dict[str, Any] = {"weights": weights, "command": " ".join(command), "returncode": child.returncode}
    if killed:
        row.update(killed_after_records=killed_at, records=_records(out), landed=landed)
    elif child.returncode != 0:
        raise SystemExit(f"{weights} run failed:\n{(out.parent / f'{out.name}.stderr').read_text()[-3000:]}")
    else:
        row.update(json.loads(stdout.strip().splitlines()[-1]))
        row["records"] = _records(out)
    # CPU seconds of the child (all its threads): the streamed run reads, updates and writes on two more threads.
    row.update(sampled_peak_rss_bytes=sampled, wall_seconds=round(wall, 1), cpu_seconds=_children_cpu() - cpu_before)
    row.update(load_before=[round(x, 2) for x in load_before], load_after=[round(x, 2) for x in os.getloadavg()])
    return row


def _kill_mid_write(child: subprocess.Popen[str], out: Path, delay: float) -> dict[str, Any]:
    """SIGKILL ``child`` ``delay`` seconds into its next step, at the first moment after that when a layer file is
    being written (a ``.tmp`` in a generation folder): the hard case, a torn file beside the last checkpoint.

    Returns where it landed: the ``.tmp`` files left (name, bytes), the layers this step had already renamed into
    place (newer than ``checkpoint.json``) and the checkpoint's step. Waits at most one more ``2 * delay`` for a
    write; kills anyway then."""
    time.sleep(delay)
    deadline = time.perf_counter() + 2 * delay
    while time.perf_counter() < deadline and not any(out.glob("weights-*/*.tmp")):
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    meta = json.loads((out / "checkpoint.json").read_text())
    stamp = (out / "checkpoint.json").stat().st_mtime
    renamed = sorted(
        f"{p.parent.name}/{p.name}" for p in out.glob("weights-*/*.safetensors") if p.stat().st_mtime > stamp
    )
    temps = {f"{p.parent.name}/{p.name}": p.stat().st_size for p in out.rglob("*.tmp")}
    return {
        "checkpoint_step": meta["step"],
        "checkpoint_folder": meta["stream"]["folder"],
        "tmp_files": temps,
        "renamed_this_step": renamed,
    }


def _records(out: Path) -> list[dict[str, Any]]:
    path = out / "steps.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(usage.ru_utime + usage.ru_stime, 1)


def _children_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def compare(resident: dict[str, Any], stream: dict[str, Any]) -> dict[str, Any]:
    a = [(r["loss_plus"], r["loss_minus"]) for r in resident["records"]]
    b = [(r["loss_plus"], r["loss_minus"]) for r in stream["records"]]
    diffs = [max(abs(x[0] - y[0]), abs(x[1] - y[1])) for x, y in zip(a, b, strict=False)]
    per_step = lambda row, key="seconds": [r[key] for r in row["records"] if key in r]  # noqa: E731
    cpu = {}
    for key in ("cpu_seconds", "main_cpu_seconds"):
        if per_step(resident, key) and per_step(stream, key):
            cpu[f"{key}_ratio_median"] = _median(per_step(stream, key)) / _median(per_step(resident, key))
    return cpu | {
        "steps_compared": min(len(a), len(b)),
        "bitwise_equal": a == b,
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "step_time_ratio": stream["seconds_per_step"] / resident["seconds_per_step"],
        "step_time_ratio_median": _median(per_step(stream)) / _median(per_step(resident)),
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def table(rows: list[dict[str, Any]], verdict: dict[str, Any]) -> str:
    lines = [
        "| run | s/step (mean) | s/step (median) | first step s | tune peak RSS (training) | child ru_maxrss | "
        "sampled peak RSS (whole life) | CPU-s/step process, main thread (median) | load avg before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        secs = [r["seconds"] for r in row["records"]]
        label = row["label"]
        tune_peak = f"{row['peak_rss_bytes'] / GIB:.3f} GiB" if "peak_rss_bytes" in row else "-"
        maxrss = f"{row['child_maxrss_bytes'] / GIB:.3f} GiB" if row.get("child_maxrss_bytes") else "-"
        sampled = f"{row['sampled_peak_rss_bytes'] / GIB:.3f} GiB" if "sampled_peak_rss_bytes" in row else "-"
        cpu = "-"
        if row["records"] and "cpu_seconds" in row["records"][0]:  # recorded by tune since this benchmark
            cpu = f"{_median([r['cpu_seconds'] for r in row['records']]):.1f}, "
            cpu += f"{_median([r['main_cpu_seconds'] for r in row['records']]):.1f}"
        load = f"{row['load_before'][0]} -> {row['load_after'][0]}" if "load_before" in row else "-"
        lines.append(
            f"| {label} | {sum(secs) / max(len(secs), 1):.2f} | {_median(secs):.2f} | {secs[0] if secs else 0:.2f} | "
            f"{tune_peak} | {maxrss} | {sampled} | {cpu} | {load} |"
        )
    lines.append("")
    if "crash" in verdict:
        crash, landed = verdict["crash"], verdict["crash"]["landed"]
        where = f"checkpoint of step {landed['checkpoint_step']} in {landed['checkpoint_folder']}, "
        where += f"{len(landed['renamed_this_step'])} layers of the step renamed, .tmp: {landed['tmp_files']}"
        lines.append(
            f"Crash: SIGKILL in step {crash['killed_after_records'] + 1} ({where}); resumed from step "
            f"{crash['resumed_from']}: records equal to the uninterrupted run's: "
            f"{crash['records_equal_uninterrupted']}, final test loss (resumed, uninterrupted) {crash['loss_after']}, "
            f"final weight files equal: {crash.get('final_weight_files_equal')}, "
            f".tmp files left: {crash['tmp_files_after_resume']}."
        )
    if "steps_compared" not in verdict:
        return "\n".join(lines) + "\n"
    lines.append(
        f"Losses (loss+ and loss- of {verdict['steps_compared']} steps): bitwise equal: {verdict['bitwise_equal']}, "
        f"max abs diff {verdict['max_abs_loss_diff']}; step time stream / resident: {verdict['step_time_ratio']:.2f}"
        f" (mean), {verdict['step_time_ratio_median']:.2f} (median)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench-out/tune-stream-1b"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-6, help="MeZO's full-parameter default")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--weight-memory", default="1GB")
    parser.add_argument("--zo-noise", default="gaussian", help="gaussian (MeZO's draw) or table (shared noise table)")
    parser.add_argument("--order", default="resident,stream", help="runs, one after the other")
    parser.add_argument("--crash-at", type=int, default=None, help="also kill a streamed run mid-step after K")
    parser.add_argument("--crash-steps", type=int, default=None, help="steps of the crash run (default --steps)")
    parser.add_argument("--compare-steps", type=Path, help="crash: also compare with this steps.jsonl's first steps")
    parser.add_argument("--drop-cache", action="store_true", help="crash: drop the page cache (machine-wide) first")
    parser.add_argument("--resident-from", type=Path, help="take the resident row from an earlier result.json")
    parser.add_argument("--collect", action="store_true", help="run nothing: tabulate the run folders in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    task = write_task(args.out / "polarity-40.jsonl")
    rows: list[dict[str, Any]] = []
    if args.resident_from is not None:
        earlier = json.loads(args.resident_from.read_text())["runs"]
        rows += [dict(r, label="resident (earlier run)") for r in earlier if r["weights"] == "resident"]
    for weights in [w for w in args.order.split(",") if w]:
        run_dir = args.out / f"run-{weights}"
        if args.collect:  # what tune wrote itself (no RSS sampling or load average)
            label = weights if weights == "resident" else f"stream --weight-memory {args.weight_memory}"
            rows.append(dict(_collected(run_dir, weights), label=label))
            continue
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        before = _children_maxrss()
        row = run_tune(args, task, weights, run_dir)
        # RUSAGE_CHILDREN is the largest child so far: it names this child only when it is the largest yet.
        row["child_maxrss_bytes"] = _children_maxrss() if _children_maxrss() > before else None
        row["label"] = weights if weights == "resident" else f"stream --weight-memory {args.weight_memory}"
        rows.append(row)
        print(f"{row['label']}: {row['seconds_per_step']:.2f} s/step, peak {row['peak_rss_bytes'] / GIB:.3f} GiB")
        _save(args, rows, {})  # as it goes: a stopped benchmark keeps its finished runs
    by = {r["weights"]: r for r in rows}
    verdict = compare(by["resident"], by["stream"]) if {"resident", "stream"} <= by.keys() else {}
    if args.crash_at is not None:
        reference = by.get("stream") or _collected(args.out / "run-stream", "stream")
        resumed, verdict["crash"] = crash_and_resume(args, task, reference)
        rows.append(resumed)
    print(_save(args, rows, verdict))
    print(json.dumps(verdict))


def crash_and_resume(args: argparse.Namespace, task: Path, reference: dict[str, Any]) -> tuple[dict, dict]:
    """A streamed run SIGKILLed mid-write in step ``crash_at + 1``, then ``--resume`` to the same step count; compared
    with the uninterrupted streamed run ``reference`` (its records, final test loss and, when it ran as many steps,
    its last checkpoint: every layer file's SHA-256 and the pending update)."""
    crash_dir = args.out / "run-crash"
    subprocess.run(["rm", "-rf", str(crash_dir)], check=True)
    steps = args.crash_steps or args.steps
    killed = run_tune(args, task, "stream", crash_dir, kill_after_step=args.crash_at, steps=steps)
    cold = drop_page_cache() if args.drop_cache else False
    resumed = run_tune(args, task, "stream", crash_dir, resume=True, steps=steps)
    resumed["label"] = f"stream resumed after SIGKILL in step {killed['killed_after_records'] + 1}"
    keys = ("loss_plus", "loss_minus", "projected_grad")
    mine = [tuple(r[k] for k in keys) for r in resumed["records"]]
    verdict: dict[str, Any] = {
        "killed_after_records": killed["killed_after_records"],
        "landed": killed["landed"],
        "killed_wall_seconds": killed["wall_seconds"],
        "page_cache_dropped_before_resume": cold,
        "resumed_from": resumed.get("resumed_from"),
        "steps": len(mine),
        "records_equal_uninterrupted": mine == [tuple(r[k] for k in keys) for r in reference["records"][:steps]],
        "loss_after": [resumed["loss_after"], reference["loss_after"]] if len(reference["records"]) == steps else None,
        "tmp_files_after_resume": sorted(str(p.relative_to(crash_dir)) for p in crash_dir.rglob("*.tmp")),
        "weight_folders_after_resume": sorted(p.name for p in crash_dir.glob("weights-*")),
        "resumed_wall_seconds": resumed["wall_seconds"],
    }
    if len(reference["records"]) == steps:  # the last checkpoint: the same layer files and the same pending update
        dirs = (crash_dir, args.out / "run-stream")
        a, b = (json.loads((d / "checkpoint.json").read_text())["stream"] for d in dirs)
        verdict["checkpoint_layers_equal"] = a["sha256"] == b["sha256"] and len(a["sha256"]) > 0
        verdict["checkpoint_pending_equal"] = a["pending"] == b["pending"]
        # The final weights: the final evaluation applied the pending update into the other generation folder.
        flip = {"weights-0": "weights-1", "weights-1": "weights-0"}
        final = [dirs[0] / flip[a["folder"]], dirs[1] / flip[b["folder"]]]
        names = sorted(p.name for p in final[1].iterdir())
        same = [filecmp.cmp(final[0] / n, final[1] / n, shallow=False) for n in names if (final[0] / n).is_file()]
        verdict["final_weight_files_equal"] = f"{sum(same)} of {len(names)}"
    if args.compare_steps is not None:  # e.g. the 20-step run's first steps
        other = [json.loads(line) for line in args.compare_steps.read_text().splitlines() if line.strip()]
        verdict["records_equal_" + str(args.compare_steps)] = mine == [tuple(r[k] for k in keys) for r in other[:steps]]
    return resumed, verdict


def _collected(run_dir: Path, weights: str) -> dict[str, Any]:
    """A finished run as tune wrote it (its last ``results.jsonl`` line, its ``steps.jsonl``)."""
    result = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    return dict(result, weights=weights, records=_records(run_dir))


def _save(args: argparse.Namespace, rows: list[dict[str, Any]], verdict: dict[str, Any]) -> str:
    """``result.json`` (settings, every run with its step records, the verdict) and ``table.md``; returns the table."""
    report = {"settings": vars(args) | {"model_dir": str(args.model_dir), "out": str(args.out)}, "runs": rows}
    report["verdict"] = verdict
    (args.out / "result.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(rows, verdict)
    (args.out / "table.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
