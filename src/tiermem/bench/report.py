"""Tables (markdown, CSV) and plots (accuracy heatmaps, accuracy against KV memory) from ``results.jsonl`` rows."""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MIB = 2**20


def _slug(name: str) -> str:
    """A file-name-safe form of a model name (a local folder is named by its last part)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name).strip("_") or "model"


def _policy_order(label: str) -> tuple[int, str, float]:
    """full first, then by policy name, then by budget (``@512``) or compression ratio (``@cr0.5``)."""
    name, _, budget = label.partition("@")
    try:
        size = float(budget.removeprefix("cr")) if budget else 0.0
    except ValueError:
        size = 0.0
    return (0 if name == "full" else 1, name, size)


def _score(row: dict[str, Any]) -> float:
    """RULER's per-sample score (rows written before scores were recorded have only ``correct``)."""
    return float(row["score"]) if row.get("score") is not None else float(bool(row["correct"]))


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else math.nan


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (model, task, policy, length): accuracy and mean costs over depths and samples."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "ok":
            groups[(row["model"], row["task"], row["policy_label"], row["length"], row["question_aware"])].append(row)
    records = []
    for (model, task, label, length, aware), group in groups.items():
        records.append(
            {
                "model": model,
                "task": task,
                "policy": label,
                "question_aware": aware,
                "length": length,
                "samples": len(group),
                "correct": sum(bool(r["correct"]) for r in group),
                "score_sum": sum(_score(r) for r in group),
                "accuracy": 100.0 * sum(_score(r) for r in group) / len(group),
                "prompt_tokens": _mean(r["prompt_tokens"] for r in group),
                "kv_tokens": _mean(r["kv_tokens"] for r in group),
                "kv_mib_decode": _mean(r["kv_bytes_decode"] for r in group) / MIB,
                "kv_mib_peak": _mean(r["kv_bytes_peak"] for r in group) / MIB,
                "peak_rss_mib": _mean(r["peak_rss_bytes"] for r in group) / MIB,
                "prefill_s": _mean(r["prefill_seconds"] for r in group),
                "decode_tok_s": _mean(r["decode_tokens_per_second"] for r in group),
            }
        )
    records.sort(key=lambda r: (r["model"], r["task"], r["question_aware"], _policy_order(r["policy"]), r["length"]))
    return records


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _task_order(records: list[dict[str, Any]]) -> list[str]:
    """The tasks of ``records`` in suite order (classic tasks, then RULER's), unknown names last."""
    from tiermem.bench.ruler import ALL_TASKS

    names = {r["task"] for r in records}
    return sorted(names, key=lambda t: (ALL_TASKS.index(t) if t in ALL_TASKS else len(ALL_TASKS), t))


def task_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, mode, policy, length): each task's accuracy and their mean (tasks weigh the same)."""
    accuracy: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for r in records:
        accuracy[(r["model"], r["question_aware"], r["policy"], r["length"])][r["task"]] = r["accuracy"]
    tasks = _task_order(records)
    rows = []
    for (model, aware, policy, length), by_task in accuracy.items():
        row: dict[str, Any] = {"model": model, "question_aware": aware, "policy": policy, "length": length}
        row |= {t: by_task[t] for t in tasks if t in by_task}  # columns in suite order
        rows.append(row | {"mean": _mean(by_task.values())})
    return sorted(rows, key=lambda r: (r["model"], r["question_aware"], _policy_order(r["policy"]), r["length"]))


def _task_markdown(records: list[dict[str, Any]]) -> list[str]:
    """Accuracy by task (columns) for every policy and length (rows), with the mean over tasks."""
    tasks = _task_order(records)
    out: list[str] = []
    by_model: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in task_table(records):
        by_model[(row["model"], row["question_aware"])].append(row)
    for (model, aware), group in by_model.items():
        mode = "question-aware" if aware else "question-agnostic"
        out += [f"### {model} · {mode} — accuracy % by task (RULER scores; mean over tasks)", ""]
        out.append("| policy | length | " + " | ".join(tasks) + " | mean |")
        out.append("|---|---|" + "---|" * (len(tasks) + 1))
        for row in group:
            cells = [f"{row[t]:.0f}" if t in row else "—" for t in tasks]
            out.append(
                f"| {row['policy']} | {_length_label(row['length'])} | " + " | ".join(cells) + f" | {row['mean']:.1f} |"
            )
        out.append("")
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """Accuracy by task and mean, accuracy tables (policy x length) per model and task, then a cost table."""
    out: list[str] = _task_markdown(records)
    by_table: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_table[(r["model"], r["task"], r["question_aware"])].append(r)
    for (model, task, aware), group in by_table.items():
        lengths = sorted({r["length"] for r in group})
        mode = "question-aware" if aware else "question-agnostic"
        out += [f"### {model} · {task} · {mode} — accuracy % (correct/samples)", ""]
        out.append("| policy | " + " | ".join(_length_label(n) for n in lengths) + " |")
        out.append("|---|" + "---|" * len(lengths))
        cells: dict[str, dict[int, str]] = defaultdict(dict)
        for r in group:
            cells[r["policy"]][r["length"]] = f"{r['accuracy']:.0f} ({r['correct']}/{r['samples']})"
        for policy in sorted(cells, key=_policy_order):
            out.append(f"| {policy} | " + " | ".join(cells[policy].get(n, "—") for n in lengths) + " |")
        out.append("")
    costs: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        costs[(r["model"], r["policy"], r["length"])].append(r)
    out += [
        "### Memory and speed (means over tasks, depths and samples)",
        "",
        "| model | policy | length | prompt tok | KV kept tok | KV at decode MiB | KV peak MiB | prefill s "
        "| decode tok/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, policy, length), group in sorted(
        costs.items(), key=lambda kv: (kv[0][0], _policy_order(kv[0][1]), kv[0][2])
    ):

        def m(key: str, group: list[dict[str, Any]] = group) -> float:
            return _mean(r[key] for r in group)

        out.append(
            f"| {model} | {policy} | {_length_label(length)} | {m('prompt_tokens'):.0f} | {m('kv_tokens'):.0f} | "
            f"{m('kv_mib_decode'):.1f} | {m('kv_mib_peak'):.1f} | {m('prefill_s'):.2f} | {m('decode_tok_s'):.1f} | "
            f"{m('peak_rss_mib'):.0f} |"
        )
    return "\n".join(out) + "\n"


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    if not records:
        path.write_text("")
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        fields = list(dict.fromkeys(key for record in records for key in record))  # rows may lack a column
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(records)


def plot_heatmaps(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per model and task: one panel per policy, accuracy by depth (rows) and length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[Any, ...], dict[str, dict[tuple[float, int], list[bool]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for row in rows:
        if row.get("status") == "ok" and row.get("depth") is not None:  # suite tasks draw depths per needle
            table = (row["model"], row["task"], row["question_aware"])
            cells[table][row["policy_label"]][(row["depth"], row["length"])].append(bool(row["correct"]))
    written = []
    for (model, task, aware), policies in cells.items():
        labels = sorted(policies, key=_policy_order)
        depths = sorted({d for p in policies.values() for d, _ in p})
        lengths = sorted({n for p in policies.values() for _, n in p})
        cols = min(4, len(labels))
        nrows = math.ceil(len(labels) / cols)
        fig, axes = plt.subplots(
            nrows,
            cols,
            figsize=(3.0 * cols + 1.2, (0.45 * len(depths) + 1.3) * nrows + 0.6),
            squeeze=False,
            layout="constrained",  # titles and labels of stacked panels do not overlap
        )
        for index, (ax, label) in enumerate(zip(axes.flat, labels, strict=False)):
            grid = [[_mean(float(x) for x in policies[label].get((d, n), [])) * 100 for n in lengths] for d in depths]
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for i, line in enumerate(grid):
                for j, value in enumerate(line):
                    if not math.isnan(value):
                        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
            ax.set_title(label, fontsize=9)
            ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
            ax.set_xlabel("prompt tokens", fontsize=8)
            if index % cols == 0:
                ax.set_ylabel("needle depth", fontsize=8)
        for ax in list(axes.flat)[len(labels) :]:
            ax.axis("off")
        mode = "question-aware" if aware else "question-agnostic"
        fig.suptitle(f"{model} · {task} · {mode}: accuracy %", fontsize=10)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        path = out_dir / f"heatmap_{_slug(model)}_{task}{'_qa' if aware else ''}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_accuracy_vs_memory(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per model: accuracy (all tasks) against KV memory held during decoding, one line per policy and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[tuple[str, int], list[tuple[float, float, int]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        family = r["policy"].split("@")[0] + (" (q-aware)" if r["question_aware"] else "")
        points[r["model"]][(family, r["length"])].append((r["kv_mib_decode"], r["score_sum"], r["samples"]))
    written = []
    for model, series in points.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        families = sorted({f for f, _ in series}, key=_policy_order)
        lengths = sorted({n for _, n in series})
        colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
        markers = dict(zip(lengths, "os^Dvp*", strict=False))
        for (family, length), pts in sorted(series.items(), key=lambda kv: (_policy_order(kv[0][0]), kv[0][1])):
            merged: dict[float, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for mib, correct, samples in pts:
                merged[round(mib, 3)][0] += correct
                merged[round(mib, 3)][1] += samples
            xs = sorted(merged)
            ys = [100 * merged[x][0] / merged[x][1] for x in xs]
            ax.plot(
                xs,
                ys,
                marker=markers.get(length, "o"),
                color=colors[family],
                label=f"{family} · {_length_label(length)}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("KV memory during decoding (MiB, log scale)")
        ax.set_ylabel("accuracy % (all tasks)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"{model}: accuracy against KV memory")
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_memory_{_slug(model)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write summary.md, summary.csv (one record per model, task, policy and length), summary_by_task.csv (tasks as
    columns, plus their mean) and the plots; return the paths written."""
    records = aggregate(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(markdown(records), encoding="utf-8")
    write_csv(records, out_dir / "summary.csv")
    write_csv(task_table(records), out_dir / "summary_by_task.csv")
    plots = plot_heatmaps(rows, out_dir) + plot_accuracy_vs_memory(records, out_dir)
    return [out_dir / "summary.md", out_dir / "summary.csv", out_dir / "summary_by_task.csv", *plots]
