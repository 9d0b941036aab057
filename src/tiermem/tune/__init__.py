"""``tiermem tune``: fine-tuning in inference-sized memory (MeZO and the ZO-Bench optimizers, ZO2-style streaming
of layers from disk) beside backprop baselines (AdamW, LoRA), on tasks that ship offline.

Python API::

    from tiermem.tune import TuneConfig, tune
    result = tune(TuneConfig(model="smollm2", method="zo-sgd", task="polarity-k16", steps=100))
    print(result.before, result.after, result.peak_rss_bytes)
"""

from tiermem.tune.config import METHODS, TuneConfig
from tiermem.tune.tasks import BUILTIN as TASKS
from tiermem.tune.tasks import DESCRIPTIONS as TASK_DESCRIPTIONS
from tiermem.tune.tasks import load_task
from tiermem.tune.trainer import TuneResult, tune

__all__ = ["METHODS", "TASKS", "TASK_DESCRIPTIONS", "TuneConfig", "TuneResult", "load_task", "tune"]
