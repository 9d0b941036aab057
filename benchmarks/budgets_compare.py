r"""Where the budget goes: uniform SnapKV vs PyramidKV (per layer) vs AdaKV (per head), same total budget.

Needle prompts (one needle, RULER-style) of ``--length`` tokens at ``--depths``, SmolLM2-135M-Instruct, greedy, 16
new tokens. For each compression ratio (kvpress's convention: kept = int(context * (1 - ratio)) tokens per layer),
each policy answers every prompt; the table gives accuracy (RULER's string_match_all) and the KV bytes held at the
end of generation (``kv_bytes_decode``), which for PyramidKV and AdaKV must match uniform SnapKV's: they move the
budget, not enlarge it. Uniform SnapKV runs with kvpress's window (64) so that only the split differs.
Accuracy only: run it alone and single-threaded; times are not reported::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budgets_compare.py --modes agnostic,aware

Rows are appended to ``--out`` (JSON lines) as they finish, and a run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from tiermem.bench.tasks import make_sample, score
from tiermem.engine import GenerationConfig, generate
from tiermem.memory import build, parse_spec
from tiermem.models import load
from tiermem.prompts import build_prompt

POLICIES = ("snapkv:window_size=64", "pyramidkv", "adakv")
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--policies", default=";".join(POLICIES), help="policy specs separated by ';'")
    parser.add_argument("--modes", default="agnostic", help="agnostic, aware, or both: agnostic,aware")
    parser.add_argument("--out", default="bench-out/budgets/results.jsonl")
    return parser.parse_args()


def configurations(args: argparse.Namespace) -> list[tuple[str, str, float | None]]:
    """(mode, policy spec, ratio): the full cache once per mode, then every policy at every ratio."""
    specs = [s for s in args.policies.split(";") if s]
    ratios = [float(r) for r in args.ratios.split(",")]
    out: list[tuple[str, str, float | None]] = []
    for mode in args.modes.split(","):
        out.append((mode, "full", None))
        out += [(mode, spec, ratio) for ratio in ratios for spec in specs]
    return out


def run_one(lm: Any, mode: str, spec: str, ratio: float | None, depth: float, length: int) -> dict[str, Any]:
    name, options = parse_spec(spec)
    policy = build(name, **options) if ratio is None else build(name, compression_ratio=ratio, **options)
    sample = make_sample("needle", lm.tokenizer, length, depth, 0)
    prompt = build_prompt(lm, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    config = GenerationConfig(max_new_tokens=16, question_aware=mode == "aware")
    result = generate(lm, prompt, policy, config)
    return {
        "mode": mode,
        "policy": spec,
        "ratio": ratio,
        "depth": depth,
        "recipe": repr(policy),
        "prompt_tokens": prompt.num_tokens,
        "kv_tokens": result.stats.kv_tokens,
        "kv_bytes_decode": result.stats.kv_bytes_decode,
        "correct": bool(score(result.text, sample.answers)),
        "text": result.text,
    }


def table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["mode"], row["ratio"], row["policy"])].append(row)
    lines = [
        "| question | ratio | policy | correct | KV MiB at decode end | kv_tokens (largest layer) |",
        "|---|---|---|---|---|---|",
    ]
    for (mode, ratio, spec), group in groups.items():
        kv = sum(r["kv_bytes_decode"] for r in group) / len(group) / MIB
        tokens = sum(r["kv_tokens"] for r in group) / len(group)
        right = sum(r["correct"] for r in group)
        ratio_text = "-" if ratio is None else f"{ratio:g}"
        lines.append(f"| {mode} | {ratio_text} | {spec} | {right}/{len(group)} | {kv:.2f} | {tokens:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    seen = {(r["mode"], r["policy"], r["ratio"], r["depth"]) for r in done}
    lm = load(args.model)
    depths = [float(d) for d in args.depths.split(",")]
    for mode, spec, ratio in configurations(args):
        for depth in depths:
            if (mode, spec, ratio, depth) in seen:
                continue
            row = run_one(lm, mode, spec, ratio, depth, args.length)
            done.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            mark = "ok " if row["correct"] else "no "
            print(f"{mark}{mode} {spec} r={ratio} d={depth} kv={row['kv_bytes_decode'] / MIB:.2f}MiB", flush=True)
    wanted = {(m, s, r) for m, s, r in configurations(args)}
    print(table([r for r in done if (r["mode"], r["policy"], r["ratio"]) in wanted and r["depth"] in depths]))


if __name__ == "__main__":
    main()
