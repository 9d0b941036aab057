"""``tune``: the training loop around a runner (resident or streamed): validation, resume, progress, results.

Order of work (every check that can fail on bad input runs before the first forward pass):

1. validate the settings, load the task (unknown or empty: error), read and verify the checkpoint when resuming;
2. load the model (an unknown model, or ``--weight-memory`` below one layer, fails here), build the runner;
3. measure inference's peak RSS on the first training batch (one forward pass, loss only), evaluate before tuning;
4. train: each step's seed and batch are functions of (seed, step), so a resumed run repeats the same steps;
   checkpoint every ``checkpoint_every`` steps and at the end; one JSON line per step in ``steps.jsonl``;
   with ``eval_every``, evaluate the task's dev split at step 0 and every N steps (:mod:`tiermem.tune.select`);
5. with ``keep_best``, put back the weights of the best dev evaluation; evaluate after tuning, save the tuned model,
   append the result to ``results.jsonl`` and plot the loss curve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from tiermem.errors import TiermemError
from tiermem.stats import peak_rss_bytes, reset_peak_rss
from tiermem.tune import checkpoint
from tiermem.tune.config import OPTIONAL_SETTINGS, TuneConfig
from tiermem.tune.objective import Batch, Objective, batch_indices
from tiermem.tune.select import KeepBest, dev_examples, scheduled_lr, set_lr
from tiermem.tune.tasks import load_task

if TYPE_CHECKING:
    from tiermem.tune.resident import ResidentRunner

STEPS_FILE, RESULTS_FILE = "steps.jsonl", "results.jsonl"


class Runner(Protocol):
    trained_parameters: int

    def evaluate(self) -> dict[str, float]: ...
    def forward_only(self, batch: Batch) -> float: ...
    def train_step(self, step: int, batch: Batch) -> dict[str, Any]: ...
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...
    def save_model(self, out: Path) -> None: ...
    def close(self) -> None: ...


@dataclass
class TuneResult:
    """What a run measured. Metrics are accuracy (classification) or perplexity (language modelling)."""

    method: str
    task: str
    model: str
    steps: int
    metric: str
    before: float
    after: float
    loss_before: float
    loss_after: float
    peak_rss_bytes: int  # during training, weights included (reset after loading)
    inference_peak_rss_bytes: int  # one forward pass on the first training batch, same process
    seconds_per_step: float
    trained_parameters: int
    weights: str
    lr: float
    eps: float | None
    batch_size: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    out: str | None = None
    dev: list[dict[str, float]] = field(default_factory=list)  # {"step", metric, "loss"} per dev evaluation
    selected_step: int | None = None  # keep_best: the step whose weights were kept
    zo_queries: int = 1  # n-SPSA directions per ZO step
    zo_noise: str = "gaussian"  # where the ZO directions came from (MeZO's draw or a noise table)
    zo_sparsity: float = 0.0  # share of coordinates where z was 0 (one mask for the run)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record[f"{self.metric}_before"] = self.before
        record[f"{self.metric}_after"] = self.after
        return record


def _open_run(config: TuneConfig) -> tuple[int, dict[str, Any] | None]:
    """(first step, checkpoint meta): validates ``--resume`` and refuses to overwrite another run's checkpoint."""
    if config.out is None:
        return 0, None
    has_checkpoint = (config.out / checkpoint.META).exists()
    if not config.resume:
        if has_checkpoint:
            raise TiermemError(f"{config.out} already holds a run's checkpoint: pass --resume or another --out")
        return 0, None
    meta = checkpoint.read_meta(config.out)
    # Absent optional settings mean their defaults, on both sides: a run resumed with another n is refused.
    settings = {**OPTIONAL_SETTINGS, **config.settings()}
    saved = {**OPTIONAL_SETTINGS, **meta.get("settings", {})}
    differing = [k for k, v in settings.items() if saved.get(k) != v]
    if differing:
        raise TiermemError(f"--resume with other settings than the checkpoint's: {', '.join(differing)}")
    if int(meta["step"]) > config.steps:
        raise TiermemError(f"the checkpoint is at step {meta['step']}, beyond --steps {config.steps}")
    return int(meta["step"]), meta


def _make_runner(config: TuneConfig, objective_factory: Callable[[Any], Objective]) -> tuple[Runner, Objective]:
    from tiermem.models import load
    from tiermem.weights.stream import StreamConfig

    if config.weights == "stream":
        from tiermem.tune.stream import StreamRunner

        runner = StreamRunner.open(config, objective_factory)
        return runner, runner.objective
    if config.uses_lora:  # the base weights are only read: the file's map is fine
        lm = load(config.model, dtype=config.dtype, weights="resident", stream=StreamConfig(config.weight_memory))
    else:
        lm = _load_for_full_training(config)
    objective = objective_factory(lm.tokenizer)
    from tiermem.tune.resident import ResidentRunner

    return ResidentRunner(lm, config, objective), objective


def _load_for_full_training(config: TuneConfig) -> Any:
    """A :class:`LoadedModel` whose weights are private aligned copies (see :func:`layer_files.load_private`)."""
    from transformers import AutoTokenizer

    from tiermem.models import DTYPES, SUPPORTED_MODEL_TYPES, LoadedModel, resolve_source
    from tiermem.tune.layer_files import load_private

    if config.dtype not in DTYPES:
        raise TiermemError(f"unknown dtype '{config.dtype}': use one of {', '.join(DTYPES)}")
    source = resolve_source(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        model = load_private(source, DTYPES[config.dtype], config.weight_memory)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, TiermemError):
            raise
        raise TiermemError(f"cannot load model from {source}: {type(exc).__name__}: {exc}") from None
    if getattr(model.config, "model_type", "?") not in SUPPORTED_MODEL_TYPES:
        raise TiermemError(f"model type '{model.config.model_type}' is not supported")
    return LoadedModel(name=config.model, model=model, tokenizer=tokenizer, source=source)


def _write_steps(out: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    checkpoint.write_atomic(out / STEPS_FILE, text.encode())


def tune(config: TuneConfig, progress: bool = False, stop_after: int | None = None) -> TuneResult:
    """Fine-tune ``config.model`` on ``config.task``; see the module docstring for the order of work.

    ``stop_after`` ends the loop after that many steps of this call without the final evaluation or save, as a crash
    would (tests use it to check that ``resume`` continues the same run); the result then reports those steps.
    """
    config.validate()
    task = load_task(config.task)
    dev_task = replace(task, test=dev_examples(task)) if config.eval_every else None
    start, meta = _open_run(config)
    runner, objective = _make_runner(config, lambda tokenizer: Objective(task, tokenizer))
    dev_objective = Objective(dev_task, objective.tokenizer) if dev_task else None
    keep, dev_curve = KeepBest(), []
    try:
        records: list[dict[str, Any]] = list(meta.get("records", [])) if meta else []
        if meta is not None and config.out is not None:
            runner.restore(checkpoint.load_tensors(config.out, meta), meta)
        batch_of = lambda step: objective.batch(  # noqa: E731
            [task.train[i] for i in batch_indices(len(task.train), config.batch_size, step, config.seed)]
        )
        reset_peak_rss()
        runner.forward_only(batch_of(start))
        inference_peak = peak_rss_bytes()
        before = meta["before"] if meta else runner.evaluate()
        base_lr = float(config.settings()["lr"])
        if dev_objective is not None:
            dev_curve.append(_dev_eval(runner, dev_objective, start, config, keep))
        reset_peak_rss()
        step_seconds: list[float] = []
        end = config.steps if stop_after is None else min(config.steps, start + stop_after)
        bar = _Bar(progress, config.steps, start)
        for step in range(start, end):
            batch = batch_of(step)
            if config.lr_schedule != "constant":
                set_lr(runner, scheduled_lr(base_lr, config.lr_schedule, step, config.steps))
            began, cpu_began, main_began = time.perf_counter(), time.process_time(), time.thread_time()
            record = runner.train_step(step, batch)
            step_seconds.append(time.perf_counter() - began)
            # CPU seconds, every thread (a streamed run reads and writes on two more) and this one: on a loaded
            # machine the wall time is mostly the scheduler's share.
            cpu = {"cpu_seconds": round(time.process_time() - cpu_began, 4)}
            cpu["main_cpu_seconds"] = round(time.thread_time() - main_began, 4)
            record = {"step": step + 1, **record, "seconds": round(step_seconds[-1], 4), **cpu}
            records.append(record)
            bar.advance(record["loss"])
            last = step + 1 == config.steps  # a run stopped early (stop_after) checkpoints only on schedule
            # A streamed run rewrites its weights every step, so it checkpoints every step (a small JSON).
            every = 1 if config.weights == "stream" else config.checkpoint_every
            if config.out is not None and ((step + 1) % every == 0 or last):
                tensors, extra = runner.state()
                checkpoint.save(
                    config.out,
                    step + 1,
                    tensors,
                    dict(extra, settings=config.settings(), records=records, before=before),
                )
                _write_steps(config.out, records)
            if dev_objective is not None and ((step + 1) % config.eval_every == 0 or last):
                dev_curve.append(_dev_eval(runner, dev_objective, step + 1, config, keep))
        bar.close()
        train_peak = peak_rss_bytes()
        crashed = stop_after is not None and end < config.steps
        if config.keep_best and not crashed:
            keep.restore(_trained_tensors(runner))
        after = before if crashed else runner.evaluate()
        if config.out is not None and config.save_model and not crashed:
            runner.save_model(config.out)
    finally:
        runner.close()
    metric = "accuracy" if task.kind == "classify" else "perplexity"
    result = TuneResult(
        method=config.method,
        task=task.name,
        model=config.model,
        steps=end,
        metric=metric,
        before=before[metric],
        after=after[metric],
        loss_before=before["loss"],
        loss_after=after["loss"],
        peak_rss_bytes=train_peak,
        inference_peak_rss_bytes=inference_peak,
        seconds_per_step=sum(step_seconds) / max(len(step_seconds), 1),
        trained_parameters=runner.trained_parameters,
        weights=config.weights,
        lr=float(config.settings()["lr"]),
        eps=config.settings()["eps"],
        batch_size=config.batch_size,
        losses=[r["loss"] for r in records],
        resumed_from=start,
        out=str(config.out) if config.out else None,
        dev=dev_curve,
        selected_step=keep.step if config.keep_best and not crashed else None,
        zo_queries=config.zo_queries,
        zo_noise=config.zo_noise,
        zo_sparsity=config.zo_sparsity,
    )
    if config.out is not None and not crashed:
        with (config.out / RESULTS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result.to_dict()) + "\n")
        _plot(config.out, result)
    return result


def _trained_tensors(runner: Runner) -> dict[str, torch.Tensor]:
    """The live trained tensors of a resident runner (``eval_every`` is resident only), by name."""
    return dict(cast("ResidentRunner", runner).named)


def _dev_eval(runner: Runner, dev: Objective, step: int, config: TuneConfig, keep: KeepBest) -> dict[str, float]:
    """Evaluate the dev split after ``step`` steps; with ``keep_best``, copy the weights if it is the best yet."""
    model = cast("ResidentRunner", runner).model
    model.eval()
    metrics = dev.evaluate(model, config.eval_batch_size)
    if config.keep_best:
        keep.observe(step, metrics, _trained_tensors(runner))
    return {"step": step, **metrics}


def _plot(out: Path, result: TuneResult) -> None:
    """``loss.png``: the training loss per step (ZO: the mean of the ±ε losses)."""
    if not result.losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(result.losses) + 1), result.losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{result.model} {result.method} on {result.task}")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


class _Bar:
    """A rich progress bar on stderr with the step's loss and the process's RSS (nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}")]
        self.progress = Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True))
        self.progress.start()
        self.task = self.progress.add_task("", total=total, completed=done)

    def advance(self, loss: float) -> None:
        if self.progress is not None:
            from tiermem.stats import current_rss_bytes

            rss = current_rss_bytes() / 2**20
            self.progress.update(self.task, advance=1, description=f"loss {loss:.4f}  RSS {rss:.0f} MiB")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
