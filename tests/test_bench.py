"""The benchmark harness runs a sweep, resumes where it stopped, and writes tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

from tiermem.bench.report import aggregate, write_report
from tiermem.bench.runner import RESULTS_FILE, BenchConfig, load_rows, run_bench
from tiermem.engine import GenerationConfig


def config(model_dir: Path) -> BenchConfig:
    return BenchConfig(
        models=[str(model_dir)],
        policies=["full", "snapkv:window_size=8", "streaming"],
        budgets=[64],
        lengths=[480],
        depths=[0.2, 0.8],
        tasks=["passkey", "needle"],
        generation=GenerationConfig(max_new_tokens=4, chunk_size=64),
        task_new_tokens=False,
    )


def test_sweep_resume_and_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rows = run_bench(config(tiny_model_dir), out)
    assert len(rows) == 2 * 2 * 3  # tasks x depths x (full, snapkv@64, streaming@64)
    assert {r["status"] for r in rows} == {"ok"}
    labels = {r["policy_label"] for r in rows}
    assert labels == {"full", "snapkv:window_size=8@64", "streaming@64"}
    snap = [r for r in rows if r["policy_label"].startswith("snapkv")]
    assert all(r["kv_tokens"] == 64 and "window_size=8" in r["recipe"] for r in snap)
    assert all(isinstance(r["correct"], bool) and r["prompt_tokens"] > 150 for r in rows)

    # A second run measures nothing again; a truncated last line (an interrupted run) is measured again.
    lines = (out / RESULTS_FILE).read_text().splitlines()
    (out / RESULTS_FILE).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    rows = run_bench(config(tiny_model_dir), out)
    assert len(rows) == 12
    assert len({json.dumps(sorted(r.items()), default=str) for r in rows}) == 12

    written = write_report(load_rows(out), out)
    names = {p.name for p in written}
    assert {"summary.md", "summary.csv"} <= names
    assert any(n.startswith("heatmap_") for n in names) and any(n.startswith("accuracy_vs_memory") for n in names)
    assert all(p.stat().st_size > 0 for p in written)
    summary = (out / "summary.md").read_text()
    assert "| full |" in summary and "streaming@64" in summary
    records = aggregate(load_rows(out))
    assert sum(r["samples"] for r in records) == 12

    # A narrower sweep over the same folder measures nothing new and reports only its own rows.
    narrow = config(tiny_model_dir)
    narrow.depths = [0.2]
    narrow.policies = ["full"]
    rows = run_bench(narrow, out)
    assert len(rows) == 2 and {(r["depth"], r["policy_label"]) for r in rows} == {(0.2, "full")}
    assert len(load_rows(out)) == 12
