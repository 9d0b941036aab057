"""``tiermem bench --ray``: the same sweep as :func:`tiermem.bench.runner.run_bench`, one Ray task per sample.

The driver builds every sample (it loads the tokenizer only, not the model) so it can apply the resume rule
before anything is sent: a sample whose rows are all in ``results.jsonl`` is not sent at all, and a task measures
only the policies still missing for its sample. Each task loads the model once per worker process (Ray reuses
worker processes, so later tasks on that worker skip the load), rebuilds the sample, checks it against the
driver's hash (a worker whose tokenizer or task generator differs would measure another prompt), builds the
prompt once and streams back one row per policy as it finishes (a streaming generator), so rows reach
``results.jsonl`` as they are measured, in completion order. The rows are the ones :func:`run_one` makes locally:
a local run and a Ray run of the same sweep differ only in :data:`PROCESS_FIELDS` (timings, and the resident
memory of the process that measured).

Resources per task: ``cpus_per_task`` CPUs (torch's intra-op threads follow them: Ray sets ``OMP_NUM_THREADS``),
and memory from the planner's peak estimate (:func:`tiermem.plan.cost.peak_bytes`) for the sample's length under
full attention, an upper bound for every budgeted policy. Ray uses it to admit tasks (it is a logical resource,
not a limit): a node runs only as many long samples at once as its memory holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiermem.bench.ruler import make_any_sample
from tiermem.bench.runner import (
    BenchConfig,
    _cells,
    append_row,
    expand_policies,
    finish,
    identity,
    open_results,
    row_key,
    run_one,
    sample_digest,
    validate,
)
from tiermem.errors import TiermemError
from tiermem.models import DTYPES, LoadedModel, load, resolve_source
from tiermem.plan.cost import Config, Shapes, peak_bytes
from tiermem.plan.probe import Machine
from tiermem.prompts import build_prompt
from tiermem.stats import current_rss_bytes

# Fields whose values depend on the process and the moment, not on the sweep: everything else in a row is the same
# whether it was measured locally or on Ray.
PROCESS_FIELDS = frozenset(
    {
        "prefill_seconds",
        "decode_seconds",
        "prefill_tokens_per_second",
        "decode_tokens_per_second",
        "peak_rss_bytes",
        "extra",
    }
)
PROMPT_MARGIN = 256  # tokens of question, chat template and answer prefix beyond the context's length
STARTED = "started"  # a task's first item: it is running (the progress bar tells running from queued)


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """The row without :data:`PROCESS_FIELDS`: equal for a local and a Ray measurement of the same cell."""
    return {k: v for k, v in row.items() if k not in PROCESS_FIELDS}


@dataclass(frozen=True)
class SampleTask:
    """One sample of the sweep and the policies (indices into :func:`expand_policies`) it still lacks."""

    model: str
    task: str
    length: int
    depth: float | None
    index: int
    digest: str
    runs: tuple[int, ...]
    memory: int  # bytes, the planner's peak estimate


def task_memory(shapes: Shapes, prompt_tokens: int, new_tokens: int, chunk: int, base_rss: int) -> int:
    """Peak bytes of one sample under full attention (every token's KV held), by the planner's cost model.

    ``peak_bytes`` reads only the machine's ``base_rss`` (the process before any model), so the rates are left
    at zero rather than probed."""
    machine = Machine(0.0, 0.0, 0.0, 0.0, 0.0, base_rss, 1, "ray task")
    total = prompt_tokens + new_tokens
    config = Config("resident", "full", total, total * shapes.kv_bytes_per_token, prompt_tokens, chunk)
    return peak_bytes(shapes, config, machine)


def plan_tasks(config: BenchConfig, done: set[str], wanted: set[str]) -> list[SampleTask]:
    """Every sample that still lacks a row, with its memory estimate; fills ``wanted`` with the sweep's keys."""
    from transformers import AutoConfig, AutoTokenizer

    runs = expand_policies(config)
    base_rss = current_rss_bytes()  # Python, torch and transformers loaded: what a worker holds before the model
    tasks = []
    for model in config.models:
        source = resolve_source(model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
            hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TiermemError(f"cannot load model from {source}: {type(exc).__name__}: {exc}") from None
        shapes = Shapes.from_config(hf_config, dtype_bytes=DTYPES[config.dtype].itemsize)
        for task, length, depth, index in _cells(config):
            sample = make_any_sample(task, tokenizer, length, depth, index, config.seed)
            missing = []
            for i, run in enumerate(runs):
                key = row_key(identity(model, sample, run, config))
                wanted.add(key)
                if key not in done:
                    missing.append(i)
            if missing:
                gen = config.generation_for(task)
                tokens = length + PROMPT_MARGIN  # the context is built to ``length`` tokens
                memory = task_memory(shapes, tokens, gen.max_new_tokens, gen.chunk_size, base_rss)
                digest = sample_digest(sample)
                tasks.append(SampleTask(model, task, length, depth, index, digest, tuple(missing), memory))
    return tasks


_MODELS: dict[tuple[str, str], LoadedModel] = {}


def _worker_model(name: str, dtype: str) -> LoadedModel:
    """The model, loaded once per worker process; a different model replaces it (one model held at a time)."""
    key = (name, dtype)
    if key not in _MODELS:
        for other in list(_MODELS):
            _MODELS.pop(other).close()
        _MODELS[key] = load(name, dtype=dtype)
    return _MODELS[key]


def measure_sample(config: BenchConfig, job: SampleTask) -> Iterator[Any]:
    """The Ray task: yields :data:`STARTED`, then one row per policy in ``job.runs`` as each finishes."""
    yield STARTED
    lm = _worker_model(job.model, config.dtype)
    sample = make_any_sample(job.task, lm.tokenizer, job.length, job.depth, job.index, config.seed)
    if sample_digest(sample) != job.digest:
        raise TiermemError(
            f"the worker built another prompt for {job.task} at {job.length} tokens than the driver did: "
            "install the same tiermem and transformers on every node"
        )
    prompt = build_prompt(lm, sample.context, sample.question, config.prompt_style, sample.answer_prefix)
    runs = expand_policies(config)
    for i in job.runs:
        yield run_one(lm, sample, prompt, runs[i], config)


@dataclass
class Tally:
    """Tasks queued, running and done, and rows written."""

    queued: int
    running: int = 0
    done: int = 0
    rows: int = 0

    def line(self) -> str:
        return f"tasks: {self.done} done, {self.running} running, {self.queued} queued; {self.rows} rows"


def run_bench_ray(
    config: BenchConfig, out_dir: Path, address: str | None = None, cpus_per_task: float = 1.0
) -> list[dict[str, Any]]:
    """Run the sweep as Ray tasks on the cluster at ``address`` (None: a local Ray on the loopback, 2 CPUs);
    rows are appended to ``out_dir/results.jsonl`` as they arrive, with the same resume rule as the local run."""
    from tiermem.raycluster import connect, disconnect

    validate(config)
    if cpus_per_task <= 0:
        raise TiermemError("CPUs per Ray task must be positive")
    done = open_results(out_dir)
    wanted: set[str] = set()
    tasks = plan_tasks(config, done, wanted)
    if tasks:
        cluster = connect(address)
        try:
            _run_tasks(config, out_dir, tasks, cpus_per_task)
        finally:
            disconnect(cluster)
    return finish(config, out_dir, wanted)


def _run_tasks(config: BenchConfig, out_dir: Path, tasks: list[SampleTask], cpus_per_task: float) -> None:
    import ray

    remote = ray.remote(num_returns="streaming")(measure_sample)
    config_ref = ray.put(config)
    pending = [remote.options(num_cpus=cpus_per_task, memory=job.memory).remote(config_ref, job) for job in tasks]
    tally = Tally(queued=len(tasks))
    columns = [TextColumn("ray"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}")]
    columns.append(TimeElapsedColumn())
    try:
        with Progress(*columns) as progress:
            bar = progress.add_task(tally.line(), total=len(tasks))
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for stream in ready:
                    if _take(stream, tally, out_dir):
                        pending.append(stream)  # more rows to come
                    else:
                        progress.advance(bar)
                progress.update(bar, description=tally.line())
    finally:
        for stream in pending:
            ray.cancel(stream)


def _take(stream: Any, tally: Tally, out_dir: Path) -> bool:
    """Consume one item of a task's stream; False once the task is finished."""
    import ray

    try:
        item = ray.get(next(stream))
    except StopIteration:
        tally.running -= 1
        tally.done += 1
        return False
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, TiermemError):
            raise TiermemError(str(cause)) from None
        raise
    if item == STARTED:
        tally.queued -= 1
        tally.running += 1
    else:
        append_row(out_dir, item)
        tally.rows += 1
    return True
