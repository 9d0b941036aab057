"""tiermem tune's model selection: the dev split, keep-best on dev, the linear lr schedule (tiny random models)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.tune_fixtures import make_tiny_tune_model
from tiermem.cli import main
from tiermem.errors import TiermemError
from tiermem.tune import TuneConfig, tune
from tiermem.tune.select import KeepBest, dev_examples, scheduled_lr
from tiermem.tune.tasks import Task, load_task, polarity_split
from tiermem.tune.trainer import TuneResult


@pytest.fixture(scope="module")
def tune_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tune_model(tmp_path_factory.mktemp("tune-select"))


def _run(tune_model: Path, **kw: object) -> TuneResult:
    settings: dict[str, object] = dict(
        model=str(tune_model), task="polarity-k16", method="zo-sgd", lr=1e-3, steps=6, batch_size=4, save_model=False
    )
    settings.update(kw)
    return tune(TuneConfig(**settings))  # type: ignore[arg-type]


def test_dev_split_is_the_unused_pool() -> None:
    task = load_task("polarity-k16")
    dev = dev_examples(task)
    texts = {e.text for e in dev}
    _, test = polarity_split(16)
    assert len(dev) == len(texts) == 68 and sum(e.label for e in dev) == 34
    assert not texts & {e.text for e in task.train} and not texts & {e.text for e in test}
    with pytest.raises(TiermemError, match="leaves no dev set"):
        dev_examples(load_task("polarity-k50"))
    with pytest.raises(TiermemError, match="has no dev split"):
        dev_examples(Task("wiki-lm", "lm", task.train, task.test, "prose"))


def test_linear_schedule_decays_to_zero() -> None:
    assert [scheduled_lr(1.0, "constant", s, 4) for s in range(4)] == [1.0] * 4
    assert [scheduled_lr(2.0, "linear", s, 4) for s in range(4)] == [2.0, 1.5, 1.0, 0.5]
    with pytest.raises(TiermemError, match="unknown lr schedule"):
        scheduled_lr(1.0, "cosine", 0, 4)


def test_keep_best_keeps_accuracy_then_loss_and_restores() -> None:
    live = {"w": torch.zeros(3)}
    keep = KeepBest()
    keep.restore(live)  # nothing kept yet: a no-op
    assert keep.observe(0, {"accuracy": 0.5, "loss": 1.0}, live)
    live["w"] += 1
    assert not keep.observe(2, {"accuracy": 0.4, "loss": 0.1}, live)  # lower accuracy, whatever the loss
    assert not keep.observe(3, {"accuracy": 0.5, "loss": 1.0}, live)  # a tie keeps the earlier step
    live["w"] += 1
    assert keep.observe(4, {"accuracy": 0.5, "loss": 0.9}, live)  # same accuracy, lower loss
    live["w"] += 1
    assert keep.step == 4 and torch.equal(keep.kept["w"], torch.full((3,), 2.0))
    keep.restore(live)
    assert torch.equal(live["w"], torch.full((3,), 2.0))
    lm = KeepBest()
    lm.observe(0, {"perplexity": 20.0, "loss": 3.0}, live)
    assert lm.observe(1, {"perplexity": 19.0, "loss": 2.9}, live) and not lm.observe(
        2, {"perplexity": 25.0, "loss": 3.2}, live
    )


@pytest.mark.parametrize("method", ["zo-sgd", "lora"])
def test_keep_best_ends_on_the_selected_steps_weights(tune_model: Path, method: str) -> None:
    lr = 1e-3 if method == "zo-sgd" else 1e-2
    best = _run(tune_model, method=method, lr=lr, eval_every=2, keep_best=True)
    assert [d["step"] for d in best.dev] == [0, 2, 4, 6]
    top = max(best.dev, key=lambda d: (d["accuracy"], -d["loss"]))
    assert best.selected_step == top["step"]
    # batches and directions are functions of (seed, step): a plain run of selected_step steps is the same model
    plain = _run(tune_model, method=method, lr=lr, steps=best.selected_step)
    assert (plain.after, plain.loss_after) == (best.after, best.loss_after)
    assert best.losses == _run(tune_model, method=method, lr=lr).losses  # evaluating dev does not change training
    watched = _run(tune_model, method=method, lr=lr, eval_every=3)
    assert watched.selected_step is None and [d["step"] for d in watched.dev] == [0, 3, 6]


def test_linear_schedule_changes_only_later_steps(tune_model: Path) -> None:
    constant = _run(tune_model, lr=5e-3)
    linear = _run(tune_model, lr=5e-3, lr_schedule="linear")
    # step 0's update uses the full lr in both; the loss of step 2 is the first one after a decayed update
    assert linear.losses[:2] == constant.losses[:2]
    assert linear.losses[2:] != constant.losses[2:]
    config = TuneConfig(lr_schedule="linear")
    assert config.settings()["lr_schedule"] == "linear" and "lr_schedule" not in TuneConfig().settings()


def test_selection_errors_are_one_line(tune_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["tune", "--model", str(tune_model), "--steps", "2", "--batch-size", "4"]
    for extra, needle in [
        (["--keep-best"], "--keep-best needs --eval-every"),
        (["--eval-every", "-1"], "--eval-every must be 0 or more"),
        (["--lr-schedule", "cosine"], "unknown --lr-schedule 'cosine'"),
        (["--eval-every", "1", "--task", "polarity-k50"], "leaves no dev set"),
        (["--eval-every", "1", "--weights", "stream"], "work with --weights resident"),
    ]:
        try:
            code = main([*base, *extra])
        except SystemExit as exc:
            code = int(exc.code or 0)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
    with pytest.raises(TiermemError, match="cannot --resume"):
        TuneConfig(eval_every=1, keep_best=True, resume=True, out=Path("x")).validate()
    assert replace(TuneConfig(), eval_every=1, keep_best=True).validate() is None
