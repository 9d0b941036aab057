"""Sweep models x tasks x lengths x depths x samples x policies x budgets; one JSON row per sample, resumable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiermem.bench.tasks import TASKS, Sample, make_sample, score
from tiermem.engine import GenerationConfig, generate
from tiermem.errors import TiermemError
from tiermem.memory import registry
from tiermem.memory.base import Policy
from tiermem.models import LoadedModel, load
from tiermem.prompts import build_prompt

RESULTS_FILE = "results.jsonl"


@dataclass
class BenchConfig:
    """One sweep. Each policy spec is ``name[:key=value,...]``; budget-taking policies run once per budget."""

    models: list[str] = field(default_factory=lambda: ["smollm2"])
    policies: list[str] = field(default_factory=lambda: ["full", "streaming", "snapkv"])
    budgets: list[int] = field(default_factory=lambda: [512])
    lengths: list[int] = field(default_factory=lambda: [2048])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    tasks: list[str] = field(default_factory=lambda: ["passkey", "needle"])
    samples: int = 1
    seed: int = 0
    max_new_tokens: int = 16
    chunk_size: int = 512
    question_aware: bool = False
    prompt_style: str = "auto"
    dtype: str = "float32"
    kv_memory: int | None = None
    kv_store: str = "auto"
    kv_alloc: str = "grow"


@dataclass(frozen=True)
class Run:
    """One cell of the sweep: which policy (with budget) answers which sample."""

    policy_spec: str
    budget: int | None
    policy: Policy

    @property
    def label(self) -> str:
        return self.policy_spec if self.budget is None else f"{self.policy_spec}@{self.budget}"


def expand_policies(config: BenchConfig) -> list[Run]:
    """Build every (policy, budget) once up front, so a bad spec fails before any model loads."""
    runs = []
    for spec in config.policies:
        name, options = registry.parse_spec(spec)
        if registry.takes_budget(name):
            runs += [Run(spec, b, registry.build(name, kv_budget=b, **options)) for b in config.budgets]
        else:
            runs.append(Run(spec, None, registry.build(name, **options)))
    return runs


def validate(config: BenchConfig) -> list[Run]:
    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown:
        raise TiermemError(f"unknown task '{unknown[0]}': use one of {', '.join(TASKS)}")
    if any(not 0 <= d <= 1 for d in config.depths):
        raise TiermemError("depths must be in [0, 1]")
    if config.samples < 1:
        raise TiermemError("samples must be at least 1")
    GenerationConfig(max_new_tokens=config.max_new_tokens, chunk_size=config.chunk_size)
    return expand_policies(config)


KEY_FIELDS = (
    "model",
    "task",
    "length",
    "depth",
    "index",
    "seed",
    "policy_label",
    "question_aware",
    "prompt_style",
    "kv_memory",
)


def identity(model: str, sample: Sample, run: Run, config: BenchConfig) -> dict[str, Any]:
    """The fields that identify one measurement (the start of its row)."""
    return {
        "model": model,
        "task": sample.task,
        "length": sample.length,
        "depth": sample.depth,
        "index": sample.index,
        "seed": config.seed,
        "policy_label": run.label,
        "question_aware": config.question_aware,
        "prompt_style": config.prompt_style,
        "kv_memory": config.kv_memory,
    }


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a measurement; a row with the same key is not measured again."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def load_rows(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / RESULTS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by an interrupted run: measured again
                continue
    return rows


def _samples(config: BenchConfig, lm: LoadedModel) -> Iterator[Sample]:
    for task in config.tasks:
        for length in config.lengths:
            for depth in config.depths:
                for index in range(config.samples):
                    yield make_sample(task, lm.tokenizer, length, depth, index, config.seed)


def run_one(lm: LoadedModel, sample: Sample, run: Run, config: BenchConfig) -> dict[str, Any]:
    prompt = build_prompt(lm, sample.context, sample.question, config.prompt_style, sample.answer_prefix)
    gen = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        chunk_size=config.chunk_size,
        question_aware=config.question_aware,
        kv_memory=config.kv_memory,
        kv_store=config.kv_store,
        kv_alloc=config.kv_alloc,
    )
    row: dict[str, Any] = identity(lm.name, sample, run, config) | {
        "policy_name": run.policy.name,
        "budget": run.budget,
        "style": prompt.style,
        "chunk_size": config.chunk_size,
        "recipe": repr(run.policy),
        "answers": list(sample.answers),
    }
    try:
        result = generate(lm, prompt, run.policy, gen)
    except TiermemError as exc:  # e.g. a prompt past the model's positions under this policy
        row.update({"status": "skipped", "reason": str(exc), "prompt_tokens": prompt.num_tokens})
        return row
    row.update({"status": "ok", "output": result.text, "correct": score(result.text, sample.answers)})
    row.update(result.stats.to_dict())
    return row


def run_bench(config: BenchConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Run the sweep, appending rows to ``out_dir/results.jsonl``; rows already there are not measured again.

    Returns the rows of this sweep only: rows from earlier, wider sweeps stay in the file but are not reported.
    """
    runs = validate(config)
    results = out_dir / RESULTS_FILE
    if results.exists() and not results.read_bytes().endswith(b"\n"):
        with results.open("a", encoding="utf-8") as handle:
            handle.write("\n")  # end the line an interrupted run cut short, so the next row starts clean
    done = {row_key(r) for r in load_rows(out_dir)}
    wanted: set[tuple[Any, ...]] = set()
    per_model = len(config.tasks) * len(config.lengths) * len(config.depths) * config.samples * len(runs)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        bar = progress.add_task("bench", total=per_model * len(config.models))
        for model_name in config.models:
            progress.update(bar, description=f"loading {model_name}")
            lm = load(model_name, dtype=config.dtype)
            for sample in _samples(config, lm):
                for run in runs:
                    key = row_key(identity(model_name, sample, run, config))
                    wanted.add(key)
                    progress.update(bar, description=f"{model_name} {sample.task} {sample.length} {run.label}")
                    if key in done:
                        progress.advance(bar)
                        continue
                    row = run_one(lm, sample, run, config)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    with results.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")
                    done.add(row_key(row))
                    progress.advance(bar)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    return [row for row in load_rows(out_dir) if row_key(row) in wanted]
