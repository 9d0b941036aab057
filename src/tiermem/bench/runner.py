"""Sweep models x tasks x lengths x depths x samples x policies x budgets; one JSON row per sample, resumable."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiermem.bench.ruler import ALL_TASKS, MIN_LENGTH, RULER_TASKS, make_any_sample, tokens_to_generate, uses_depth
from tiermem.bench.tasks import Sample
from tiermem.engine import GenerationConfig, generate
from tiermem.errors import TiermemError
from tiermem.memory import registry
from tiermem.memory.base import Policy
from tiermem.models import LoadedModel, load
from tiermem.prompts import Prompt, build_prompt

RESULTS_FILE = "results.jsonl"


@dataclass
class BenchConfig:
    """One sweep. Each policy spec is ``name[:key=value,...]``; budget-taking policies run once per budget, or once
    per compression ratio when ``compression_ratios`` is set (kvpress's convention: the fraction of the context
    removed; ``budgets`` is then unused).

    ``generation`` is how every answer is generated (its ``store`` says where KV lives). With ``task_new_tokens``
    each task generates its own number of tokens (RULER's per task, 16 for the classic tasks) instead of
    ``generation.max_new_tokens``. ``seed`` draws the samples (``generation.seed`` is for sampling).
    """

    models: list[str] = field(default_factory=lambda: ["smollm2"])
    policies: list[str] = field(default_factory=lambda: ["full", "streaming", "snapkv"])
    budgets: list[int] = field(default_factory=lambda: [512])
    compression_ratios: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=lambda: [2048])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    tasks: list[str] = field(default_factory=lambda: ["passkey", "needle"])
    samples: int = 1
    seed: int = 0
    dtype: str = "float32"
    weights_quant: str = "none"  # weight-only quantized Linear layers: none, int8, int4 (groups of quant_group)
    quant_group: int = 32
    prompt_style: str = "auto"
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=16))
    task_new_tokens: bool = True

    def generation_for(self, task: str) -> GenerationConfig:
        """The generation configuration a task's samples run under."""
        if not self.task_new_tokens:
            return self.generation
        return replace(self.generation, max_new_tokens=tokens_to_generate(task))


@dataclass(frozen=True)
class Run:
    """One cell of the sweep: which policy (with budget or compression ratio) answers which sample."""

    policy_spec: str
    budget: int | None
    policy: Policy
    compression_ratio: float | None = None

    @property
    def label(self) -> str:
        if self.compression_ratio is not None:
            return f"{self.policy_spec}@cr{self.compression_ratio:g}"
        return self.policy_spec if self.budget is None else f"{self.policy_spec}@{self.budget}"


def expand_policies(config: BenchConfig) -> list[Run]:
    """Build every (policy, budget or ratio) once up front, so a bad spec fails before any model loads."""
    runs = []
    for spec in config.policies:
        name, options = registry.parse_spec(spec)
        if not registry.takes_budget(name):
            runs.append(Run(spec, None, registry.build(name, **options)))
        elif config.compression_ratios:
            for ratio in config.compression_ratios:
                policy = registry.build(name, compression_ratio=ratio, **options)
                runs.append(Run(spec, None, policy, compression_ratio=ratio))
        else:
            runs += [Run(spec, b, registry.build(name, kv_budget=b, **options)) for b in config.budgets]
    return runs


def validate(config: BenchConfig) -> list[Run]:
    unknown = [t for t in config.tasks if t not in ALL_TASKS]
    if unknown:
        raise TiermemError(f"unknown task '{unknown[0]}': use one of {', '.join(ALL_TASKS)}")
    if any(not 0 <= d <= 1 for d in config.depths):
        raise TiermemError("depths must be in [0, 1]")
    if config.samples < 1:
        raise TiermemError("samples must be at least 1")
    if any(t in RULER_TASKS for t in config.tasks) and min(config.lengths) < MIN_LENGTH:
        raise TiermemError(f"suite tasks need lengths of at least {MIN_LENGTH} tokens, got {min(config.lengths)}")
    return expand_policies(config)


def sample_digest(sample: Sample) -> str:
    """A short hash of the prompt's text and answers: a changed task generator measures again."""
    text = "\x00".join([sample.context, sample.question, sample.answer_prefix, *sample.answers])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def identity(model: str, sample: Sample, run: Run, config: BenchConfig) -> dict[str, Any]:
    """The fields that identify one measurement (the start of its row): the model and its dtype, the sample (and a
    hash of its text), the policy's full recipe, and the whole generation configuration (chunk size, new tokens, KV
    store, allocator...). A rerun that changes any of them measures again.

    Formats added later (``weights_quant``, the store's ``kv_dtype``) appear only when not their default, so rows
    measured before they existed keep their keys."""
    generation = asdict(config.generation_for(sample.task))
    if generation["store"].get("kv_dtype") == "auto":
        del generation["store"]["kv_dtype"]
    quant = {}
    if config.weights_quant != "none":
        group = f"-g{config.quant_group}" if config.weights_quant == "int4" else ""
        quant["weights_quant"] = config.weights_quant + group
    return quant | {
        "model": model,
        "dtype": config.dtype,
        "prompt_style": config.prompt_style,
        "task": sample.task,
        "length": sample.length,
        "depth": sample.depth,
        "index": sample.index,
        "seed": config.seed,
        "sample": sample_digest(sample),
        "policy_label": run.label,
        "recipe": repr(run.policy),
        "generation": generation,
    }


KEY_FIELDS = (
    "model",
    "weights_quant",
    "dtype",
    "prompt_style",
    "task",
    "length",
    "depth",
    "index",
    "seed",
    "sample",
    "policy_label",
    "recipe",
    "generation",
)


def row_key(row: dict[str, Any]) -> str:
    """What identifies a measurement; a row with the same key is not measured again (JSON, so a row read back from
    results.jsonl, whose tuples are lists, has the key it was written with)."""
    return json.dumps([row.get(k) for k in KEY_FIELDS], sort_keys=True)


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


def _cells(config: BenchConfig) -> Iterator[tuple[str, int, float | None, int]]:
    """(task, length, depth, index) of every sample; suite tasks draw their own depths (depth None)."""
    for task in config.tasks:
        for length in config.lengths:
            depths: list[float | None] = list(config.depths) if uses_depth(task) else [None]
            for depth in depths:
                for index in range(config.samples):
                    yield task, length, depth, index


def run_one(lm: LoadedModel, sample: Sample, prompt: Prompt, run: Run, config: BenchConfig) -> dict[str, Any]:
    gen = config.generation_for(sample.task)
    row: dict[str, Any] = identity(lm.name, sample, run, config) | {
        "policy_name": run.policy.name,
        "budget": run.budget,
        "compression_ratio": run.compression_ratio,
        "question_aware": gen.question_aware,
        "style": prompt.style,
        "metric": sample.metric,
        "answers": list(sample.answers),
    }
    try:
        result = generate(lm, prompt, run.policy, gen)
    except TiermemError as exc:  # e.g. a prompt past the model's positions under this policy
        row.update({"status": "skipped", "reason": str(exc), "prompt_tokens": prompt.num_tokens})
        return row
    value = sample.score(result.text)
    row.update({"status": "ok", "output": result.text, "score": value, "correct": value == 1.0})
    row.update(result.stats.to_dict())
    return row


def run_bench(config: BenchConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Run the sweep, appending rows to ``out_dir/results.jsonl``; rows already there are not measured again.

    Each sample's prompt is built once and answered by every policy. Returns the rows of this sweep only: rows from
    earlier, wider sweeps stay in the file but are not reported.
    """
    runs = validate(config)
    done = open_results(out_dir)
    wanted: set[str] = set()
    cells = list(_cells(config))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        bar = progress.add_task("bench", total=len(cells) * len(runs) * len(config.models))
        for model_name in config.models:
            progress.update(bar, description=f"loading {model_name}")
            lm = load(model_name, config.dtype, weights_quant=config.weights_quant, quant_group=config.quant_group)
            for task, length, depth, index in cells:
                progress.update(bar, description=f"{model_name} {task} {length} (building the prompt)")
                sample = make_any_sample(task, lm.tokenizer, length, depth, index, config.seed)
                prompt: Prompt | None = None
                for run in runs:
                    key = row_key(identity(model_name, sample, run, config))
                    wanted.add(key)
                    progress.update(bar, description=f"{model_name} {task} {length} {run.label}")
                    if key not in done:
                        if prompt is None:  # built once, shared by every policy
                            prompt = build_prompt(
                                lm, sample.context, sample.question, config.prompt_style, sample.answer_prefix
                            )
                        row = run_one(lm, sample, prompt, run, config)
                        append_row(out_dir, row)
                        done.add(row_key(row))
                    progress.advance(bar)
    return finish(config, out_dir, wanted)


def open_results(out_dir: Path) -> set[str]:
    """The keys of the rows already measured in ``out_dir`` (the resume rule: a row with the same key is not
    measured again); a last line an interrupted run cut short is ended first, so the next row starts clean."""
    results = out_dir / RESULTS_FILE
    if results.exists() and not results.read_bytes().endswith(b"\n"):
        with results.open("a", encoding="utf-8") as handle:
            handle.write("\n")
    return {row_key(r) for r in load_rows(out_dir)}


def append_row(out_dir: Path, row: dict[str, Any]) -> None:
    """Append one measured row to ``out_dir/results.jsonl`` (one line, so a crash loses at most that row)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / RESULTS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def finish(config: BenchConfig, out_dir: Path, wanted: set[str]) -> list[dict[str, Any]]:
    """Write the sweep's configuration; return the rows of this sweep (by key) in file order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    return [row for row in load_rows(out_dir) if row_key(row) in wanted]
