"""``tiermem demo``: the same long prompts answered under full attention and under SnapKV, side by side."""

from __future__ import annotations

import argparse

from rich import box
from rich.console import Console
from rich.table import Table

from tiermem.bench.tasks import make_sample, score
from tiermem.cli_args import load_options
from tiermem.engine import GenerationConfig, generate
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import registry
from tiermem.models import BUNDLED, load
from tiermem.prompts import build_prompt

DEMO_LENGTH = 4096
DEMO_DEPTHS = (0.25, 0.5, 0.75)
# (policy, budget, question-aware): SnapKV as kvpress runs it, then in its paper's own setting, then tiermem's variant.
DEMO_POLICIES = (
    ("full", None, False),
    ("snapkv", 512, False),
    ("snapkv", 512, True),
    ("snapkv-sentence", 512, True),
)


def cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    description = BUNDLED[args.model].description if args.model in BUNDLED else args.model
    console.print(f"[bold]tiermem demo[/] · model [cyan]{args.model}[/] ({description})")
    lm = load(args.model, **load_options(args))
    samples = [make_sample("needle", lm.tokenizer, DEMO_LENGTH, depth, 0) for depth in DEMO_DEPTHS]
    prompts = [build_prompt(lm, s.context, s.question, answer_prefix=s.answer_prefix) for s in samples]
    console.print(
        f"Task: find a 7-digit number hidden in ~{DEMO_LENGTH} tokens of news prose, at depths "
        f"{', '.join(f'{d:.0%}' for d in DEMO_DEPTHS)}."
    )
    table = Table(title="the same prompts under four KV policies", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("policy", "found", "KV tok", "KV MiB", "prefill s", "tok/s"):
        table.add_column(column, justify="left" if column in ("policy", "found") else "right", no_wrap=True)
    misses = []
    for name, budget, aware in DEMO_POLICIES:
        policy = registry.build(name, kv_budget=budget) if budget else registry.build(name)
        config = GenerationConfig(max_new_tokens=16, question_aware=aware, store=StoreConfig(kv_dtype=args.kv_dtype))
        label = name + (f"@{budget}" if budget else "") + (" +question" if aware else "")
        results = []
        with console.status(f"running {label}..."):
            for sample, prompt in zip(samples, prompts, strict=True):
                results.append((sample, generate(lm, prompt, policy, config)))
        found = [score(r.text, s.answers) for s, r in results]
        misses += [
            f"{label}: expected {s.answers[0]}, got {r.text.strip()[:40]!r}"
            for s, r in results
            if not score(r.text, s.answers)
        ]
        stats = [r.stats for _, r in results]
        n = len(stats)
        table.add_row(
            label,
            f"{sum(found)}/{n}",
            f"{sum(s.kv_tokens for s in stats) // n}",
            f"{sum(s.kv_bytes_decode for s in stats) / n / 2**20:.1f}",
            f"{sum(s.prefill_seconds for s in stats) / n:.2f}",
            f"{sum(s.decode_tokens_per_second for s in stats) / n:.1f}",
        )
    console.print(table)
    if misses:
        console.print("Misses (first words of the answer):\n  " + "\n  ".join(misses[:6]))
    console.print(
        "KV MiB: keys and values held while decoding; tok/s: decode speed. Question-agnostic SnapKV compresses "
        "the context before it sees the question (as kvpress does), so it keeps what the end of the context attends "
        "to; with +question the question steers the selection (SnapKV's own setting). snapkv-sentence scores each "
        "token by the most attention any window query gives it and keeps whole sentences, so a 7-token number "
        "survives whole (a tiermem variant). More: tiermem bench --help, BENCHMARKS.md"
    )
    return 0
