"""The report of ``kvpress_compare.py``: accuracy, speed, token counts and sample-by-sample agreement tables."""

from __future__ import annotations

import hashlib
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from _kvpress_harness import length_label, load_prompts, mean


def report(rows: list[dict[str, Any]], prompts: Path) -> str:
    if not rows:
        return "no results yet\n"
    columns = sorted({(r["task"], r["length"]) for r in rows})
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["system"], r["policy"], r["compression_ratio"])].append(r)
    order = {"none": 0, "full": 0, "snapkv": 1, "streaming": 2, "snapkv-chunk": 3}
    keys = sorted(groups, key=lambda k: (k[0], k[2], order.get(k[1], 9), k[1]))
    lengths = sorted({n for _, n in columns})

    def speed(g: list[dict[str, Any]], field: str, n: int, agg: Any, digits: int) -> str:
        values = [r[field] for r in g if r["length"] == n]
        return f"{agg(values):.{digits}f}" if values else "-"

    head = ["system", "policy", "ratio", *[f"{t} {length_label(n)}" for t, n in columns], "all"]
    head += [f"prefill s {length_label(n)}" for n in lengths]
    head += [f"decode tok/s {length_label(n)}" for n in lengths]
    head += [f"kept KV {length_label(n)}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    speed_head = ["system", "policy", "ratio"]
    speed_head += [f"prefill s {length_label(n)}" for n in lengths] + [
        f"decode tok/s {length_label(n)}" for n in lengths
    ]
    medians = ["| " + " | ".join(speed_head) + " |", "|" + "|".join(["---"] * len(speed_head)) + "|"]
    for key in keys:
        g = groups[key]
        cells = [key[0], key[1], f"{key[2]:g}"]
        for col in columns:
            sub = [r for r in g if (r["task"], r["length"]) == col]
            cells.append(f"{sum(r['correct'] for r in sub)}/{len(sub)}" if sub else "-")
        cells.append(f"{sum(r['correct'] for r in g)}/{len(g)}")
        cells += [speed(g, "prefill_seconds", n, mean, 2) for n in lengths]
        cells += [speed(g, "decode_tokens_per_second", n, mean, 1) for n in lengths]
        cells += [speed(g, "kv_tokens", n, mean, 0) for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
        row = [key[0], key[1], f"{key[2]:g}"]
        row += [speed(g, "prefill_seconds", n, statistics.median, 2) for n in lengths]
        row += [speed(g, "decode_tokens_per_second", n, statistics.median, 1) for n in lengths]
        medians.append("| " + " | ".join(row) + " |")
    out = [
        "## Accuracy (correct/samples), mean prefill seconds, mean decode tokens/s, mean KV tokens kept per layer",
        "",
        *lines,
        "",
        "## Speed medians (robust to load spikes from other processes on the 2 cores)",
        "",
        *medians,
        "",
    ]

    # Token counts: kvpress's own template vs tiermem's, per sample.
    kv = {(r["task"], r["length"], r["depth"], r["index"]): r for r in rows if r["system"] == "kvpress"}  # own template
    if kv:
        ctx_same = sum(r["context_ids_match"] for r in kv.values())
        q_same = sum(r["question_ids_match"] for r in kv.values())
        dq = sorted({r["question_tokens"] - r["tiermem_question_tokens"] for r in kv.values()})
        dc = sorted({r["context_tokens"] - r["tiermem_context_tokens"] for r in kv.values()})
        out += [
            "## Token counts (kvpress pipeline vs tiermem build_prompt)",
            "",
            f"- samples compared: {len(kv)}",
            f"- context ids identical: {ctx_same}/{len(kv)} (context token difference kvpress - tiermem: {dc})",
            f"- question ids identical: {q_same}/{len(kv)} (question token difference kvpress - tiermem: {dq})",
            "",
            "| task | length | depth | kvpress context | tiermem context | kvpress question | tiermem question |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in sorted(kv):
            r = kv[k]
            out.append(
                f"| {k[0]} | {length_label(k[1])} | {k[2]:g} | {r['context_tokens']} | {r['tiermem_context_tokens']} "
                f"| {r['question_tokens']} | {r['tiermem_question_tokens']} |"
            )
        out.append("")

    # Agreement of the uncompressed baselines with tiermem's full cache, sample by sample.
    def baseline(system: str, policy: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {
            (r["task"], r["length"], r["depth"], r["index"]): r
            for r in rows
            if r["system"] == system and r["policy"] == policy
        }

    base_tm = baseline("tiermem", "full")
    for system in ("kvpress", "kvpress[tiermem-ids]"):
        base_kv = baseline(system, "none")
        shared = sorted(set(base_kv) & set(base_tm))
        if not shared:
            continue
        same_text = sum(base_kv[k]["output"].strip() == base_tm[k]["output"].strip() for k in shared)
        same_correct = sum(base_kv[k]["correct"] == base_tm[k]["correct"] for k in shared)
        out += [
            f"## {system} no-press vs tiermem full",
            "",
            f"- same correctness: {same_correct}/{len(shared)}; identical output text: {same_text}/{len(shared)}",
        ]
        for k in shared:
            a, b = base_kv[k]["output"].strip(), base_tm[k]["output"].strip()
            if a != b:
                out.append(f"- {k[0]} {length_label(k[1])} d={k[2]:g}: {system} {a!r} / tiermem {b!r}")
        out.append("")
    # Compressed configurations side by side, sample by sample (same ratio, same samples).
    pairs = [
        (("kvpress", "snapkv"), ("tiermem", "snapkv")),
        (("kvpress", "streaming"), ("tiermem", "streaming")),
        (("kvpress[tiermem-ids]", "snapkv"), ("tiermem", "snapkv:window_size=64")),
        (("kvpress[tiermem-ids]", "streaming"), ("tiermem", "streaming:rerotate=false")),
        (("kvpress[tiermem-ids]", "streaming"), ("tiermem", "streaming")),
    ]
    by_cell: dict[tuple[str, str, float], dict[tuple[Any, ...], dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_cell[(r["system"], r["policy"], r["compression_ratio"])][
            (r["task"], r["length"], r["depth"], r["index"])
        ] = r
    pair_lines = []
    for (sys_a, pol_a), (sys_b, pol_b) in pairs:
        for ratio in sorted({k[2] for k in by_cell if k[:2] == (sys_a, pol_a)}):
            a_rows, b_rows = by_cell[(sys_a, pol_a, ratio)], by_cell.get((sys_b, pol_b, ratio), {})
            shared = sorted(set(a_rows) & set(b_rows))
            if not shared:
                continue
            same_text = sum(a_rows[k]["output"].strip() == b_rows[k]["output"].strip() for k in shared)
            same_correct = sum(a_rows[k]["correct"] == b_rows[k]["correct"] for k in shared)
            pair_lines.append(
                f"| {sys_a} {pol_a} | {sys_b} {pol_b} | {ratio:g} | {len(shared)} | {same_text} | {same_correct} |"
            )
    if pair_lines:
        out += [
            "## Compressed runs, sample by sample",
            "",
            "| A | B | ratio | samples | identical output | same correctness |",
            "|---|---|---|---|---|---|",
            *pair_lines,
            "",
        ]
    checks = [r for r in rows if "pipeline_match" in r]
    if checks:
        out.append(
            f"kvpress replica vs real `pipe(...)`: {sum(r['pipeline_match'] for r in checks)}/{len(checks)} "
            "identical answers (first sample of each press spec, in each kvpress worker run)."
        )
    if prompts.exists():
        digest = hashlib.sha256(prompts.read_bytes()).hexdigest()[:16]
        out.append(f"Prompts: {prompts} (sha256 {digest}, {len(load_prompts(prompts))} samples).")
    loads = [r["load_avg_1m"] for r in rows if "load_avg_1m" in r]
    if loads:
        out.append(f"1-minute load average at sample start: min {min(loads):.1f}, max {max(loads):.1f} (2 cores).")
    return "\n".join(out) + "\n"
