r"""kvpress's presses vs tiermem's policies on the RULER-style suite: same prompts, same token ids, same KV bytes.

Run from the repository root (resumable: rows already in results.jsonl are not measured again)::

    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/kvpress_suite.py > bench-out/kvpress-suite/run.log 2>&1 &

1. Creates ``.venv-kvpress`` if needed (kvpress 0.5.5, transformers 5.2.0; see ``_kvpress_harness``).
2. Exports the suite's prompts (10 tasks, ``--lengths``, ``--samples`` per task, ``--seed``) with tiermem's
   tokenization to ``prompts.jsonl``; both systems read these exact context and question ids. Each task answers in
   at most its RULER generation length, capped by ``--max-new-tokens`` (the same cap for both systems).
3. Runs the kvpress worker in ``.venv-kvpress`` (``_suite_kvpress``: no press, then each press at each ratio) and
   the tiermem worker in ``.venv`` (``_suite_tiermem``: full, then each question-agnostic policy at each ratio),
   both at once (``--sequential`` runs one after the other), then tiermem's question-aware row.
   Both sides prefill each prompt once and compress copies; each worker's ``--check`` proves that equal to the
   real path (kvpress's ``with press(model)``, tiermem's ``generate``) on a 1k-token prefix.
4. Writes ``report.md``: per-task score (RULER's metric, %) x policy for each ratio, the mean, the best of each
   system, and the kept KV tokens per layer of each configuration (equal bytes at equal ratio).

Like with like: kvpress compresses the context before reading the question, so every kvpress press is compared
with tiermem's question-agnostic policies; tiermem's question-aware ``snapkv-sentence`` (context and question
compressed together) is a separate, labelled row, not a candidate for "tiermem's best".
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kvpress_harness import (
    KVPRESS_PY,
    ROOT,
    TIERMEM_PY,
    ensure_kvpress_venv,
    env_offline,
    length_label,
    load_jsonl,
    load_prompts,
    log,
    mean,
    parse_tokens,
    split,
)

TASKS = "niah_number,niah_word,niah_uuid,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe,qa"
KVPRESS = "none,expected,adakv-expected,snapkv,pyramidkv,knorm,tova,streaming"
TIERMEM = (
    "full,expected-attention,adakv-expected-attention,snapkv,pyramidkv,adakv,knorm,tova,"
    "streaming:rerotate=false+evict_during_prefill=false"
)
QAWARE = "snapkv-sentence"
UNCOMPRESSED = ("none", "full")


def cells(policies: str, ratios: str) -> list[tuple[str, float]]:
    """(policy, ratio) in the order measured: baselines once (ratio 0), then ratio by ratio."""
    specs = split(policies)
    out = [(p, 0.0) for p in specs if p in UNCOMPRESSED]
    return out + [(p, float(r)) for r in split(ratios) for p in specs if p not in UNCOMPRESSED]


def worker(args: argparse.Namespace) -> None:
    out = Path(args.out)
    samples = load_prompts(out / "prompts.jsonl", {parse_tokens(x) for x in split(args.lengths)}, args.limit)
    order = split(args.tasks)  # a worker answers these tasks' prompts, in this order (disjoint lists: two at once)
    samples = sorted((s for s in samples if s["task"] in order), key=lambda s: order.index(s["task"]))
    if args.worker == "export":
        from _suite_tiermem import export

        lengths = [parse_tokens(x) for x in split(args.lengths)]
        export(out / "prompts.jsonl", split(args.tasks), lengths, args.samples, args.seed, args.max_new_tokens)
    elif args.worker == "kvpress":
        from _suite_kvpress import run as run_kvpress

        run_kvpress(out, samples, cells(args.kvpress, args.ratios), args.check)
    elif args.worker == "tiermem":
        from _suite_tiermem import run as run_tiermem

        run_tiermem(out, samples, cells(args.tiermem, args.ratios), False, args.check)
        if args.qaware:
            run_tiermem(out, samples, cells(args.qaware, args.ratios), True, args.check)


def worker_command(python: Path, name: str, args: argparse.Namespace) -> list[str]:
    options = ["--out", args.out, "--lengths", args.lengths, "--ratios", args.ratios, "--limit", str(args.limit)]
    options += ["--kvpress", args.kvpress, "--tiermem", args.tiermem, "--qaware", args.qaware]
    options += ["--check", str(args.check), "--tasks", args.tasks, "--samples", str(args.samples)]
    options += ["--seed", str(args.seed), "--max-new-tokens", str(args.max_new_tokens)]
    return [str(python), str(Path(__file__).resolve()), "--worker", name, *options]


def orchestrate(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_kvpress_venv(args.base_python, out)
    if not (out / "prompts.jsonl").exists() or args.refresh_prompts:
        subprocess.run(worker_command(TIERMEM_PY, "export", args), check=True, env=env_offline(), cwd=ROOT)
    commands = [worker_command(KVPRESS_PY, "kvpress", args), worker_command(TIERMEM_PY, "tiermem", args)]
    if args.sequential:
        for command in commands:
            subprocess.run(command, check=True, env=env_offline(), cwd=ROOT)
        return
    log("starting the kvpress and tiermem workers side by side")
    running = [subprocess.Popen(c, env=env_offline(), cwd=ROOT) for c in commands]
    codes = [p.wait() for p in running]
    if any(codes):
        raise SystemExit(f"worker exit codes {codes}")


# --------------------------------------------------------------------------------------------------------------------
# Report


# kvpress press -> the tiermem policy that ports it with the same defaults (tiermem's snapkv keeps the paper's
# window 32, kvpress's 64: not a pair)
PAIRS = {
    "none": "full",
    "expected": "expected-attention",
    "adakv-expected": "adakv-expected-attention",
    "pyramidkv": "pyramidkv",
    "knorm": "knorm",
    "tova": "tova",
    "streaming": "streaming:rerotate=false+evict_during_prefill=false",
}


def pairs(rows: list[dict[str, Any]], shared: set[tuple[str, int, int]]) -> list[str]:
    """Sample-by-sample agreement of each kvpress press with its tiermem port, per ratio."""
    cell = {(r["system"], r["policy"], r["compression_ratio"], r["task"], r["length"], r["index"]): r for r in rows}
    lines = ["## kvpress press vs its tiermem port, sample by sample", ""]
    lines += ["| kvpress | tiermem | ratio | prompts | identical output | same score |", "|---|---|---|---|---|---|"]
    for ratio in sorted({r["compression_ratio"] for r in rows}):
        for press, port in PAIRS.items():
            both = [
                (cell[("kvpress", press, ratio, *p)], cell[("tiermem", port, ratio, *p)])
                for p in sorted(shared)
                if ("kvpress", press, ratio, *p) in cell and ("tiermem", port, ratio, *p) in cell
            ]
            if both:
                same = sum(a["output"].strip() == b["output"].strip() for a, b in both)
                score = sum(a["score"] == b["score"] for a, b in both)
                lines.append(f"| {press} | {port} | {ratio:g} | {len(both)} | {same} | {score} |")
    return [*lines, ""]


def report(out: Path) -> str:
    rows = load_jsonl(out / "results.jsonl")
    if not rows:
        return "no results yet\n"
    prompts = {(r["task"], r["length"], r["index"]) for r in rows}
    tasks = [t for t in split(TASKS) if any(p[0] == t for p in prompts)]
    groups: dict[tuple[str, str, float], dict[tuple[str, int, int], float]] = defaultdict(dict)
    kept: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for r in rows:
        key = (r["system"], r["policy"], r["compression_ratio"])
        groups[key][(r["task"], r["length"], r["index"])] = r["score"]
        kept[key].append(mean(r["kept_per_layer"]) / r["context_tokens"])
    failed: dict[tuple[str, str, float], int] = defaultdict(int)
    for e in load_jsonl(out / "errors.jsonl"):
        failed[(e["system"], e["policy"], e["compression_ratio"])] += 1
    # Only prompts that every configuration without failures answered: each mean is over the same prompts.
    shared = set.intersection(*(set(g) for k, g in groups.items() if not failed[k]))
    lines = [f"Prompts answered by every configuration: {len(shared)} of {len(prompts)}.", ""]

    def score_cells(key: tuple[str, str, float]) -> tuple[list[str], float]:
        g = {p: v for p, v in groups[key].items() if p in shared}
        per_task = [[v for p, v in g.items() if p[0] == t] for t in tasks]
        task_means = [100 * mean(v) for v in per_task]
        return [f"{m:.0f}" if v else "-" for m, v in zip(task_means, per_task, strict=True)], mean(
            [m for m, v in zip(task_means, per_task, strict=True) if v]
        )

    head = ["system", "policy", *tasks, "mean", "kept KV / context"]
    ratios = sorted({k[2] for k in groups if k[2] > 0})
    summary = ["| ratio | kvpress best | mean | tiermem best (question-agnostic) | mean | tiermem >= kvpress |"]
    summary.append("|---|---|---|---|---|---|")
    for ratio in ratios:
        lines += [f"### Compression ratio {ratio:g} (KV kept: {1 - ratio:.3g} of the context)", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        keys = [k for k in groups if k[2] in (0.0, ratio)]
        keys.sort(key=lambda k: (k[2] != 0.0, k[0], -score_cells(k)[1]))
        best: dict[str, tuple[float, str]] = {}
        for key in keys:
            task_cells, avg = score_cells(key)
            frac = mean(kept[key])
            name = f"{key[1]} (failed on {failed[key]} prompts)" if failed[key] else key[1]
            lines.append(f"| {key[0]} | {name} | " + " | ".join(task_cells) + f" | **{avg:.1f}** | {frac:.3f} |")
            eligible = key[2] == ratio and key[0] in ("kvpress", "tiermem") and not failed[key]
            if eligible and avg > best.get(key[0], (-1.0, ""))[0]:
                best[key[0]] = (avg, key[1])
        lines.append("")
        if "kvpress" in best and "tiermem" in best:
            (kv, kv_name), (tm, tm_name) = best["kvpress"], best["tiermem"]
            summary.append(
                f"| {ratio:g} | {kv_name} | {kv:.1f} | {tm_name} | {tm:.1f} | {'yes' if tm >= kv else 'no'} |"
            )
    lengths = ", ".join(length_label(n) for n in sorted({p[1] for p in prompts}))
    intro = [
        f"Scores: RULER's metric per sample (string_match_all fraction; qa string_match_part), in %, at {lengths}.",
        "Uncompressed baselines (ratio 0) are repeated in every table. kept KV / context: context tokens kept per",
        "layer and KV head, averaged over layers, divided by the context length (kvpress AdaKV: unmasked keys).",
        "A configuration that failed on some prompts (errors.jsonl) is shown on the prompts it answered and is not",
        "a candidate for best.",
        "",
        "## Best of each system (question-agnostic, same prompts)",
        "",
        *summary,
        "",
    ]
    intro += pairs(rows, shared)
    for name, check in (("replay-check.jsonl", "kvpress replay"), ("fork-check.jsonl", "tiermem fork")):
        checked = load_jsonl(out / name)
        if checked:
            same = sum(r["identical"] for r in checked)
            intro.append(f"{check} vs the real path: {same}/{len(checked)} identical.")
    return "\n".join([*intro, "", *lines]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["export", "kvpress", "tiermem"], help="internal: one worker")
    parser.add_argument("--report", action="store_true", help="only write report.md from results.jsonl")
    parser.add_argument("--out", default=str(ROOT / "bench-out" / "kvpress-suite"))
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--lengths", default="4k")
    parser.add_argument("--samples", type=int, default=1, help="samples per task and length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="cap on each task's RULER length (0: none)")
    parser.add_argument("--ratios", default="0.5,0.75,0.875")
    parser.add_argument("--kvpress", default=KVPRESS, help="kvpress presses (see _suite_kvpress.PRESSES)")
    parser.add_argument("--tiermem", default=TIERMEM, help="tiermem question-agnostic registry specs (+ joins options)")
    parser.add_argument("--qaware", default=QAWARE, help="tiermem question-aware specs ('' for none)")
    parser.add_argument("--check", type=int, default=1024, help="check the shared prefill on N tokens (0: no)")
    parser.add_argument("--limit", type=int, default=0, help="first N samples per task and length (0: all)")
    parser.add_argument("--sequential", action="store_true", help="one worker after the other")
    parser.add_argument("--refresh-prompts", action="store_true")
    parser.add_argument("--base-python", default=shutil.which("python3.11") or sys.executable)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.report:
        orchestrate(args)
    text = report(Path(args.out))
    (Path(args.out) / "report.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
