"""Model selection for ``tiermem tune``: a dev split, keep-the-best-on-dev, and an optional linear lr decay.

MeZO (Malladi et al. 2023) trains with a constant learning rate and ends on the checkpoint that scores best on a
validation set disjoint from the training set (``large_models/mezo.sh``: ``--lr_scheduler_type constant
--load_best_model_at_end --evaluation_strategy steps --eval_steps 4000``, 500 dev examples). Here:

- :func:`dev_examples`: ``polarity-kK`` leaves ``50 - K`` of its pool sentences per class unused (the 50 per class of
  the test set are fixed); they are the dev set (68 sentences for k=16, none for k=50). Other tasks have no dev set.
- :class:`KeepBest`: scores each dev evaluation by accuracy, then loss (classification), or by perplexity (LM), and
  keeps a copy of the trained tensors of the best one; :meth:`KeepBest.restore` puts them back before the test.
  The copy is the trained tensors only (LoRA: 0.46M numbers on SmolLM2; full: the model's size once more, which
  counts toward the run's peak RSS).
- :func:`scheduled_lr`: ``constant`` (MeZO's, the default) or ``linear`` decay to 0 at the last step (the HF
  Trainer's ``linear`` schedule without warm-up); a departure from MeZO offered as a named option, because a
  constant lr large enough to move a 135M model in a few hundred steps diverges later (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import torch

from tiermem.errors import TiermemError
from tiermem.tune.tasks import Example, Task, polarity_split

SCHEDULES = ("constant", "linear")


def dev_examples(task: Task) -> tuple[Example, ...]:
    """The dev set of ``task``: the polarity pool sentences that ``polarity-kK`` uses neither to train nor to test."""
    if not task.name.startswith("polarity-k"):
        raise TiermemError(f"task '{task.name}' has no dev split: --eval-every works with the polarity tasks")
    k = int(task.name.removeprefix("polarity-k"))
    pool, test = polarity_split(50)
    used = {e.text for e in task.train} | {e.text for e in test}
    dev = tuple(e for e in pool if e.text not in used)
    if not dev:
        raise TiermemError(f"polarity-k{k} trains on every pool sentence: it leaves no dev set for --eval-every")
    return dev


def scheduled_lr(base: float, schedule: str, step: int, steps: int) -> float:
    """The lr of 0-based ``step`` out of ``steps``: ``base`` (constant) or ``base·(1 − step/steps)`` (linear)."""
    if schedule == "constant":
        return base
    if schedule == "linear":
        return base * (1 - step / max(steps, 1))
    raise TiermemError(f"unknown lr schedule '{schedule}': use one of {', '.join(SCHEDULES)}")


def set_lr(runner: Any, lr: float) -> None:
    """Point a runner's optimizer at ``lr``: the ZO hyper-parameters, or every group of a torch optimizer."""
    from dataclasses import replace

    if getattr(runner, "zo", None) is not None:
        runner.zo.hyper = replace(runner.zo.hyper, lr=lr)
    elif getattr(runner, "optimizer", None) is not None:
        for group in runner.optimizer.param_groups:
            group["lr"] = lr


def score(metrics: dict[str, float]) -> tuple[float, float]:
    """Larger is better: (accuracy, −loss) for classification, (−perplexity, −loss) for language modelling."""
    if "accuracy" in metrics:
        return metrics["accuracy"], -metrics["loss"]
    return -metrics["perplexity"], -metrics["loss"]


class KeepBest:
    """The best dev evaluation seen so far and a copy of the trained tensors at that moment.

    ``tensors``: name -> the live trained tensor (any shape), as a runner's ``state()`` names them; they are copied
    when an evaluation beats the best (ties keep the earlier, fewer-step one) and copied back by :meth:`restore`.
    """

    def __init__(self) -> None:
        self.best: dict[str, float] | None = None
        self.step: int | None = None
        self.kept: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self, step: int, metrics: dict[str, float], tensors: dict[str, torch.Tensor]) -> bool:
        """Record the dev ``metrics`` after ``step`` steps; True (and a copy of ``tensors``) when it is the best."""
        if self.best is not None and score(metrics) <= score(self.best):
            return False
        self.best, self.step = dict(metrics), step
        if self.kept.keys() == tensors.keys():  # reuse the copy: a full model is not held twice while replacing it
            for name, t in tensors.items():
                self.kept[name].copy_(t)
        else:
            self.kept = {name: t.detach().clone() for name, t in tensors.items()}
        return True

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the kept tensors back into the live ones (a no-op before the first :meth:`observe`)."""
        for name, saved in self.kept.items():
            tensors[name].copy_(saved)
