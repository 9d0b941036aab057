"""The planner's predictions against measurements: time per decoded token, prefill time, peak RSS.

    .venv/bin/python benchmarks/plan_validate.py --big-model /work/llama-1.1b-random --out bench-out/plan_validate.jsonl

Probes the machine once (``--reprobe`` measures again), then for each configuration runs one generation in its
own subprocess (so peaks do not mix) with tiermem's engine: a random-token prompt of the given length, 16 new
tokens with EOS ignored, and compares with the cost model's prediction for the same configuration. Configurations:
SmolLM2 resident with full attention at 2k tokens and with infllm-small at 8k; the random 1.1B Llama (from
``benchmarks/make_random_llama.py``) resident and streamed with 3 layers held (the read loader, the one the
planner models), at 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULT = "PLAN_VALIDATE "


def configurations(big: str) -> list[dict[str, Any]]:
    return [
        {"model": "smollm2", "weights": "resident", "policy": "full", "context": 2048},
        {"model": "smollm2", "weights": "resident", "policy": "infllm-small", "context": 8192, "kv_memory": 256},
        {"model": big, "weights": "resident", "policy": "full", "context": 512},
        {"model": big, "weights": "stream", "k": 3, "policy": "full", "context": 512},
    ]


def predicted(spec: dict[str, Any], reprobe: bool) -> dict[str, dict[str, float]]:
    """The cost model's numbers, from the machine's rates alone ("roofline") and with the model's layer measured
    under the policy ("calibrated", what ``tiermem plan`` uses)."""
    from transformers import AutoConfig

    from tiermem.models import cache_root, resolve_source
    from tiermem.plan.choose import INFLLM_SMALL_HOT
    from tiermem.plan.cost import Config, Shapes, predict
    from tiermem.plan.layer_profile import profile_layer
    from tiermem.plan.probe import probe

    hf_config = AutoConfig.from_pretrained(str(resolve_source(spec["model"])))
    shapes = Shapes.from_config(hf_config)
    machine = probe(cache_root() / "probe.json", force=reprobe)
    total = spec["context"] + 16
    if spec["policy"] == "full":
        hot, kv_ram = total, total * shapes.kv_bytes_per_token
    else:
        hot, kv_ram = INFLLM_SMALL_HOT, spec["kv_memory"] * 2**20
    out = {}
    profile = profile_layer(hf_config, spec["policy"], min(spec["context"], 2048), hot)
    for name, layer in (("roofline", None), ("calibrated", profile)):
        config = Config(
            spec["weights"], spec["policy"], hot, kv_ram, spec["context"], k=spec.get("k", 0), profile=layer
        )
        p = predict(shapes, config, machine)
        out[name] = {"decode_s": p.decode_s, "prefill_s": p.prefill_s, "peak_bytes": p.peak_bytes}
    return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from tiermem.engine import GenerationConfig, generate
    from tiermem.memory.registry import build
    from tiermem.models import load
    from tiermem.prompts import Prompt
    from tiermem.weights.stream import StreamConfig

    stream = StreamConfig(prefetch_layers=spec["k"], loader="read") if spec["weights"] == "stream" else None
    lm = load(spec["model"], weights=spec["weights"], stream=stream)
    rng = random.Random(0)
    ids = torch.tensor([[rng.randrange(256, lm.model.config.vocab_size) for _ in range(spec["context"])]])
    prompt = Prompt(ids, ids[:, :0], "completion")
    kv_memory = spec.get("kv_memory")
    config = GenerationConfig(max_new_tokens=16, stop_on_eos=False, kv_memory=kv_memory * 2**20 if kv_memory else None)
    stats = generate(lm, prompt, build(spec["policy"]), config).stats
    lm.close()
    return {
        "decode_s": stats.decode_seconds / stats.decode_steps,
        "prefill_s": stats.prefill_seconds,
        "peak_bytes": stats.peak_rss_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-model", default="/work/llama-1.1b-random")
    parser.add_argument("--reprobe", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench-out/plan_validate.jsonl"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT + json.dumps(measure(json.loads(args.worker))), flush=True)
        return
    rows = []
    for index, spec in enumerate(configurations(args.big_model)):
        guess = predicted(spec, args.reprobe and index == 0)  # before the run, on the same quiet machine
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if not lines:
            print(f"{spec}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        got = json.loads(lines[-1][len(RESULT) :])
        row = {"spec": spec, "predicted": guess, "measured": got}
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("\n| configuration | decode ms/token: roofline | calibrated | measured | calibrated / measured "
          "| prefill s: calibrated | measured | ratio | peak MiB: predicted | measured |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, r, p, m = row["spec"], row["predicted"]["roofline"], row["predicted"]["calibrated"], row["measured"]
        name = Path(s["model"]).name
        label = f"{name} {s['weights']}{' k=' + str(s['k']) if 'k' in s else ''} {s['policy']} @{s['context']}"
        print(
            f"| {label} | {r['decode_s'] * 1e3:.1f} | {p['decode_s'] * 1e3:.1f} | {m['decode_s'] * 1e3:.1f} "
            f"| {p['decode_s'] / m['decode_s']:.2f} | {p['prefill_s']:.1f} | {m['prefill_s']:.1f} "
            f"| {p['prefill_s'] / m['prefill_s']:.2f} | {p['peak_bytes'] / 2**20:.0f} | {m['peak_bytes'] / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
