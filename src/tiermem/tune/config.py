"""What one ``tiermem tune`` run is: the method table with each method's paper defaults, and the run's settings.

Methods (``--method``):

- ``zo-sgd`` (MeZO), ``zo-sgd-sign``, ``zo-sgd-mmt``, ``zo-adam`` (ZO-Bench): zeroth-order, two forward passes per
  step, every parameter (or, with ``lora=True``, only LoRA's A and B); rules in :mod:`tiermem.tune.zo`.
- ``zo-lora``: MeZO's LoRA setting, ZO-SGD on LoRA adapters (r=8, α=16, q/v projections) with MeZO's LoRA lr and ε.
- ``adamw``: full fine-tuning by backpropagation with ``torch.optim.AdamW`` (MeZO's "FT" baseline: Adam, lr from
  its grid {1e-5, 5e-5, 8e-5}, we take 1e-5; weight decay 0).
- ``lora``: LoRA by backpropagation with AdamW (MeZO's "FT (LoRA)" baseline: lr 1e-4 from its grid {1e-4, 5e-4}).

Model selection (:mod:`tiermem.tune.select`): ``eval_every`` evaluates a dev split every N steps, ``keep_best`` ends
on the best of those evaluations (MeZO's ``--load_best_model_at_end``), ``lr_schedule`` is ``constant`` (MeZO's) or
``linear`` decay. ``zo_queries`` = n > 1 is MeZO's n-SPSA (n directions averaged per step, :mod:`tiermem.tune.zo`).
``zo_noise`` is ``gaussian`` (MeZO's fresh draw) or ``table`` (evolution strategies' shared noise table, 64 MiB:
:mod:`tiermem.tune.perturb`). ``zo_sparsity`` = s > 0 zeroes z on a share s of every tensor's coordinates, one mask
for the run (ZO-Bench's gradient sparsity, :class:`~tiermem.tune.perturb.SparseNoise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiermem.errors import TiermemError
from tiermem.tune.perturb import NOISE_KINDS, Noise, make_noise
from tiermem.tune.select import SCHEDULES
from tiermem.tune.zo import ZO_DEFAULTS, ZO_METHODS, ZOHyper

BACKPROP_LR = {"adamw": 1e-5, "lora": 1e-4}
METHODS = (*ZO_METHODS, "zo-lora", "adamw", "lora")
WEIGHTS = ("resident", "stream")
# Settings that :meth:`TuneConfig.settings` records only when not at these defaults (older checkpoints lack them).
OPTIONAL_SETTINGS: dict[str, object] = {
    "lr_schedule": "constant",
    "zo_queries": 1,
    "zo_noise": "gaussian",
    "zo_sparsity": 0.0,
}


@dataclass
class TuneConfig:
    """One run. ``lr``/``eps`` of None take the method's defaults; ``out`` of None keeps nothing on disk."""

    model: str = "smollm2"
    method: str = "zo-sgd"
    task: str = "polarity-k16"
    steps: int = 100
    lr: float | None = None
    eps: float | None = None
    batch_size: int = 16
    weights: str = "resident"
    weight_memory: int | None = None
    out: Path | None = None
    resume: bool = False
    seed: int = 0
    dtype: str = "float32"
    lora: bool = False  # ZO methods: train LoRA adapters instead of every parameter
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False  # backprop methods: recompute activations in the backward pass
    checkpoint_every: int = 50  # steps between checkpoints (needs ``out``); the last step always checkpoints
    eval_batch_size: int = 16
    save_model: bool = True  # write the tuned model to ``out/model`` (and the adapter to ``out/adapter``)
    eval_every: int = 0  # steps between dev evaluations (0: none); they count toward the training peak RSS
    keep_best: bool = False  # end on the best dev evaluation's weights (needs eval_every)
    lr_schedule: str = "constant"  # or "linear" (decay to 0 at the last step)
    zo_queries: int = 1  # n-SPSA (MeZO's Definition 1): directions averaged per ZO step; MeZO's default is 1
    zo_noise: str = "gaussian"  # or "table": z from a shared noise table (faster; :mod:`tiermem.tune.perturb`)
    zo_sparsity: float = 0.0  # ZO-Bench's gradient sparsity: z is 0 on this share of coordinates, fixed per run

    @property
    def zo(self) -> bool:
        return self.method in ZO_METHODS or self.method == "zo-lora"

    @property
    def zo_rule(self) -> str:
        return "zo-sgd" if self.method == "zo-lora" else self.method

    @property
    def uses_lora(self) -> bool:
        return self.method in ("zo-lora", "lora") or (self.lora and self.method in ZO_METHODS)

    def hyper(self) -> ZOHyper:
        """The ZO hyper-parameters: the method's defaults (full or LoRA), overridden by ``lr``/``eps``."""
        full, lora = ZO_DEFAULTS[self.zo_rule]
        base = lora if self.uses_lora else full
        return ZOHyper(
            lr=self.lr if self.lr is not None else base.lr,
            eps=self.eps if self.eps is not None else base.eps,
            weight_decay=self.weight_decay,
            momentum=base.momentum,
            betas=base.betas,
            adam_eps=base.adam_eps,
        )

    def backprop_lr(self) -> float:
        return self.lr if self.lr is not None else BACKPROP_LR[self.method]

    def settings(self) -> dict[str, object]:
        """What must match for ``--resume`` to continue the same run."""
        lr = self.hyper().lr if self.zo else self.backprop_lr()
        eps = self.hyper().eps if self.zo else None
        return {
            "model": self.model,
            "method": self.method,
            "task": self.task,
            "lr": lr,
            "eps": eps,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "dtype": self.dtype,
            "lora": self.uses_lora,
            "weight_decay": self.weight_decay,
            # only when set, so that checkpoints written before the option resume unchanged
            **({"lr_schedule": self.lr_schedule} if self.lr_schedule != "constant" else {}),
            **({"zo_queries": self.zo_queries} if self.zo_queries != 1 else {}),
            **({"zo_noise": self.zo_noise} if self.zo_noise != "gaussian" else {}),
            **({"zo_sparsity": self.zo_sparsity} if self.zo_sparsity else {}),
        }

    def noise(self) -> Noise:
        """Where a ZO run's directions come from: ``zo_noise``, masked by ``zo_sparsity`` (mask seed: the run's)."""
        return make_noise(self.zo_noise, self.zo_sparsity, self.seed)

    def validate(self) -> None:
        """One-line errors for settings that cannot run, before anything is loaded."""
        if self.method not in METHODS:
            raise TiermemError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if self.weights not in WEIGHTS:
            raise TiermemError(f"unknown weight placement '{self.weights}' for tune: use resident or stream")
        if self.steps < 0:
            raise TiermemError(f"--steps must be 0 or more, got {self.steps}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise TiermemError("--batch-size must be at least 1")
        if self.checkpoint_every < 1:
            raise TiermemError("--checkpoint-every must be at least 1")
        for flag, value in (("--lr", self.lr), ("--eps", self.eps)):
            if value is not None and not value > 0:
                raise TiermemError(f"{flag} must be positive, got {value}")
        if self.eps is not None and not self.zo:
            raise TiermemError(f"--eps applies to zeroth-order methods, not {self.method}")
        if self.lora and self.method not in ZO_METHODS:
            raise TiermemError(f"--lora applies to {', '.join(ZO_METHODS)}; use --method lora or zo-lora")
        if self.weights == "stream" and (self.method not in ("zo-sgd", "zo-sgd-sign") or self.uses_lora):
            raise TiermemError(
                "--weights stream trains every parameter with zo-sgd or zo-sgd-sign (momentum and Adam state, "
                "and LoRA, are not streamed)"
            )
        if self.gradient_checkpointing and self.zo:
            raise TiermemError("--gradient-checkpointing applies to backprop methods (adamw, lora)")
        self._validate_queries()
        if self.resume and self.out is None:
            raise TiermemError("--resume needs --out DIR (the folder of the run to continue)")
        self._validate_selection()

    def _validate_queries(self) -> None:
        if self.zo_noise not in NOISE_KINDS:
            raise TiermemError(f"unknown --zo-noise '{self.zo_noise}': use one of {', '.join(NOISE_KINDS)}")
        if self.zo_noise != "gaussian" and not self.zo:
            raise TiermemError(f"--zo-noise applies to zeroth-order methods, not {self.method}")
        if not 0 <= self.zo_sparsity < 1:
            raise TiermemError(f"--zo-sparsity is a share of coordinates in [0, 1), got {self.zo_sparsity}")
        if self.zo_sparsity and not self.zo:
            raise TiermemError(f"--zo-sparsity applies to zeroth-order methods, not {self.method}")
        if self.zo_queries < 1:
            raise TiermemError(f"--zo-queries must be at least 1, got {self.zo_queries}")
        if self.zo_queries == 1:
            return
        if not self.zo:
            raise TiermemError(f"--zo-queries applies to zeroth-order methods, not {self.method}")
        if self.zo_rule == "zo-sgd-sign":
            raise TiermemError("--zo-queries above 1 needs zo-sgd, zo-sgd-mmt or zo-adam (sign takes one g per step)")
        if self.weights == "stream":
            raise TiermemError("--zo-queries above 1 works with --weights resident (the streamed step takes one)")

    def _validate_selection(self) -> None:
        if self.eval_every < 0:
            raise TiermemError(f"--eval-every must be 0 or more, got {self.eval_every}")
        if self.lr_schedule not in SCHEDULES:
            raise TiermemError(f"unknown --lr-schedule '{self.lr_schedule}': use one of {', '.join(SCHEDULES)}")
        if self.keep_best and not self.eval_every:
            raise TiermemError("--keep-best needs --eval-every N (the dev evaluations to choose from)")
        if self.eval_every and self.weights == "stream":
            raise TiermemError("--eval-every and --keep-best work with --weights resident")
        if self.keep_best and self.resume:
            raise TiermemError("--keep-best cannot --resume: the kept weights are not part of the checkpoint")
