"""``tiermem tune``: arguments and entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tiermem.errors import TiermemError
from tiermem.units import parse_size


def add_tune_parser(sub: Any) -> None:
    from tiermem.cli_args import add_dtype_arg
    from tiermem.tune.config import METHODS, WEIGHTS

    tune = sub.add_parser("tune", help="fine-tune with forward passes only (MeZO, ZO-Bench) or backprop baselines")
    tune.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, a local HF folder or a .gguf file")
    add_dtype_arg(tune, preset="exact")  # training runs in float32 unless told otherwise
    tune.add_argument("--method", default="zo-sgd", choices=list(METHODS), help="optimizer (default zo-sgd: MeZO)")
    tune.add_argument("--task", default="polarity-k16", help="a task of --list-tasks, or a .jsonl/.txt file")
    tune.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    tune.add_argument("--steps", type=int, default=100, help="optimizer steps")
    tune.add_argument("--lr", type=float, help="learning rate (default: the method's paper default)")
    tune.add_argument("--eps", type=float, help="ZO perturbation scale ε (default: the method's)")
    tune.add_argument("--batch-size", type=int, default=16, help="training examples per step (MeZO: 16)")
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--lora", action="store_true", help="ZO methods: train LoRA adapters (r=8, q/v) only")
    tune.add_argument("--gradient-checkpointing", action="store_true", help="backprop methods: recompute activations")
    tune.add_argument("--weights", default="resident", choices=list(WEIGHTS), help="stream: ZO2-style, layers on disk")
    tune.add_argument("--weight-memory", type=parse_size, help="RAM for weights, e.g. 1GB")
    tune.add_argument("--seed", type=int, default=0, help="seed of the directions and the batches")
    tune.add_argument("--out", type=Path, help="run folder: checkpoints, steps.jsonl, results.jsonl, model/")
    tune.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tune.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    tune.add_argument("--no-save-model", action="store_true", help="do not write the tuned model to --out/model")
    tune.add_argument("--eval-every", type=int, default=0, help="evaluate the task's dev split every N steps")
    tune.add_argument("--keep-best", action="store_true", help="end on the best dev evaluation (needs --eval-every)")
    tune.add_argument("--lr-schedule", default="constant", help="constant (MeZO's) or linear decay to 0")
    tune.add_argument("--zo-queries", type=int, default=1, help="n-SPSA: ZO directions averaged per step (MeZO: 1)")
    tune.add_argument(
        "--zo-noise", default="gaussian", help="gaussian (MeZO's draw) or table (a shared noise table: faster steps)"
    )
    tune.add_argument(
        "--zo-sparsity",
        type=float,
        default=0.0,
        help="ZO-Bench's gradient sparsity: z is 0 on this share of each tensor, one mask per run (default 0)",
    )
    tune.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")


def cmd_tune(args: argparse.Namespace) -> int:
    from tiermem.tune.config import TuneConfig
    from tiermem.tune.tasks import DESCRIPTIONS
    from tiermem.tune.trainer import tune

    if args.list_tasks:
        for name, text in DESCRIPTIONS.items():
            print(f"{name:14s} {text}")
        return 0
    if args.weight_memory is not None and args.weight_memory <= 0:
        raise TiermemError("--weight-memory must be positive")
    config = TuneConfig(
        model=args.model,
        method=args.method,
        task=args.task,
        steps=args.steps,
        lr=args.lr,
        eps=args.eps,
        batch_size=args.batch_size,
        weights=args.weights,
        weight_memory=args.weight_memory,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        dtype=args.dtype,
        lora=args.lora,
        weight_decay=args.weight_decay,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        save_model=not args.no_save_model,
        eval_every=args.eval_every,
        keep_best=args.keep_best,
        lr_schedule=args.lr_schedule,
        zo_queries=args.zo_queries,
        zo_noise=args.zo_noise,
        zo_sparsity=args.zo_sparsity,
    )
    result = tune(config, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    unit = "" if result.metric == "perplexity" else " (accuracy)"
    print(
        f"[{result.method}] {result.task}: {result.metric} {result.before:.4f} -> {result.after:.4f}{unit} "
        f"after {result.steps} steps, {result.seconds_per_step:.2f} s/step, "
        f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB "
        f"(inference {result.inference_peak_rss_bytes / 2**20:.0f} MiB)"
    )
    if result.selected_step is not None:
        print(f"kept the weights of step {result.selected_step} (best on the dev split)")
    if result.out:
        print(f"saved to {result.out} (model/: tiermem generate --model {Path(result.out) / 'model'})")
    return 0
