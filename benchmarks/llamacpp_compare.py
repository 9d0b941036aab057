"""Decode and prefill speed of llama.cpp (llama-cpp-python) against tiermem and HF ``generate``, same model, same ids.

One command does everything (from the repository root, with the project's venv); the reported run was::

    .venv/bin/python benchmarks/llamacpp_compare.py --lengths 512,4096,8100 --profile

(the default ``--lengths 4096,8100`` gives the 4k and 8k rows only; the 512-token row separates the per-step cost that
does not depend on the KV length).

It will, in order:

1. create ``.venv-llamacpp`` (gitignored by ``.venv-*/``) and build llama-cpp-python there from source, once
   (about 11 minutes on 2 cores; skipped when the right version is already importable). The build is::

       python3 -m venv .venv-llamacpp
       CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
           .venv-llamacpp/bin/pip install --no-binary llama-cpp-python "llama-cpp-python[server]==0.3.36"

   (``--setup-only`` stops after this step; its log goes to ``bench-out/llamacpp/build.log``. The ``[server]`` extra
   is for ``benchmarks/serve_vs_llamacpp.py``, which runs llama-cpp-python's OpenAI server from the same venv.)
2. export the prompts with ``benchmarks/export_prompts.py`` (needle task, depth 0.5) so every system reads the same
   token ids: tiermem's tokenization, chat template included (``bench-out/llamacpp/prompts.jsonl``);
3. for each prompt length, run each system in its own fresh process (so peak RSS is per system):

   - ``llama.cpp``: the bundled SmolLM2-135M-Instruct Q4_1 GGUF through llama-cpp-python's low-level API
     (``llama_decode`` on ``llama_batch_get_one``; prefill in ``n_batch`` chunks, greedy argmax on the logits);
     ``use_extra_bufts=False`` (a model param, not a ``Llama(...)`` keyword) because the extra-buffer-type (AMX /
     repacked) matmul path segfaulted on the first decode on another machine. On this one (no AMX in /proc/cpuinfo)
     Q4_1 tensors cannot be repacked anyway (the load log says so), so the flag changes nothing in the graph;
   - ``tiermem full`` and ``tiermem snapkv@512``: ``tiermem.engine.generate`` on the same GGUF dequantized to fp32;
   - ``HF generate``: ``model.generate`` of the same fp32 model (its default attention), timed with a streamer;

4. print a markdown table (also written to ``bench-out/llamacpp/results.md``, raw numbers to ``results.json``).

Every system does exactly ``--steps`` (32) single-token decode forwards after the prefill, EOS ignored (tiermem's
stop set is emptied for the run; HF gets ``min_new_tokens``; llama.cpp's loop never stops early), all with 2 threads.
Prefill tokens/s is prompt tokens over the time until the first new token's logits; decode tokens/s is decode
forwards over their time. ``--profile`` adds a breakdown of tiermem's decode step at the longest length (torch
profiler plus isolated timings of the linear layers and of attention over the KV cache).

Shared machines: before each process the script waits (``--wait-idle``) until the CPUs are idle, measures the CPU that
other processes took during the run (the table's last column), and reruns a measurement (``--retries``) when that is
above ``--max-load`` (5%). This is needed: 2 OpenMP threads on 2 cores wait for each other whenever a neighbour takes a
core, and decode speed then drops by large factors (measured here: HF decode at 4k went from 16 to 6.4 tok/s at 22%
other load; llama.cpp at 600 tokens fell to 0.2 tok/s on a fully busy machine).

Other flags: ``--lengths`` (export_prompts lengths; 8100 keeps the 8k prompt, 8121 tokens, plus 33 new tokens inside
SmolLM2's 8192 positions, 8k would not), ``--systems llamacpp,full``, ``--steps``, ``--threads``, ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _decode_profile import profile_report, worker_profile
from _decode_workers import worker_hf, worker_llamacpp, worker_tiermem
from _machine import cpu_jiffies, thread_env, tree_state, wait_for_idle

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench-out" / "llamacpp"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
LLAMACPP_VENV = ROOT / ".venv-llamacpp"
LLAMACPP_PYTHON = LLAMACPP_VENV / "bin" / "python"
LLAMACPP_VERSION = "0.3.36"
LLAMACPP_CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"  # LLAVA (mtmd) is not needed here and slows the build

SYSTEMS = {
    "llamacpp": "llama.cpp Q4_1",
    "full": "tiermem full (fp32)",
    "snapkv": "tiermem snapkv@512 (fp32)",
    "fast": "tiermem full (default formats)",
    "fast-snapkv": "tiermem snapkv@512 (default formats)",
    "fast-python": "tiermem full (defaults, Python step)",
    "fast-kvbf16": "tiermem full (defaults, bf16 KV)",
    "fast-kvf32": "tiermem full (defaults, fp32 KV)",
    "hf": "HF generate (fp32)",
}
RESULT_TAG = "RESULT "


# ---------------------------------------------------------------------------------------------- setup


def llamacpp_installed() -> bool:
    if not LLAMACPP_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(LLAMACPP_PYTHON), "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0 and probe.stdout.strip() == LLAMACPP_VERSION


def ensure_llamacpp_venv() -> None:
    """Create ``.venv-llamacpp`` and build llama-cpp-python from source into it, unless already there."""
    if llamacpp_installed():
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log = OUT_DIR / "build.log"
    if not LLAMACPP_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMACPP_VENV)], check=True)
    print(f"building llama-cpp-python {LLAMACPP_VERSION} from source (~11 min on 2 cores); log: {log}", flush=True)
    env = dict(os.environ, CMAKE_ARGS=LLAMACPP_CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    cmd = [str(LLAMACPP_PYTHON), "-m", "pip", "install", "-v", "--no-binary", "llama-cpp-python"]
    with log.open("w") as handle:
        subprocess.run(
            [*cmd, f"llama-cpp-python[server]=={LLAMACPP_VERSION}"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=True,
        )
    if not llamacpp_installed():
        raise SystemExit(f"llama-cpp-python did not install; see {log}")


def export_prompts(lengths: str, out: Path) -> list[dict[str, Any]]:
    """The needle prompts at ``lengths`` (export_prompts.py syntax), exported once per set of lengths."""
    meta = out.with_suffix(".lengths")
    if not out.exists() or not meta.exists() or meta.read_text() != lengths:
        cmd = [str(MAIN_PYTHON), str(ROOT / "benchmarks" / "export_prompts.py"), "--model", "smollm2"]
        cmd += ["--tasks", "needle", "--lengths", lengths, "--depths", "0.5", "--out", str(out)]
        subprocess.run(cmd, check=True, env=thread_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        meta.write_text(lengths)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


WORKERS = {
    "llamacpp": lambda row, a: worker_llamacpp(row, a.steps, a.threads),
    "full": lambda row, a: worker_tiermem(row, a.steps, a.threads, "full"),
    "snapkv": lambda row, a: worker_tiermem(row, a.steps, a.threads, "snapkv"),
    "fast": lambda row, a: worker_tiermem(row, a.steps, a.threads, "full", fast=True),
    "fast-snapkv": lambda row, a: worker_tiermem(row, a.steps, a.threads, "snapkv", fast=True),
    "fast-python": lambda row, a: worker_tiermem(row, a.steps, a.threads, "full", fast=True, decode_step="python"),
    "fast-kvbf16": lambda row, a: worker_tiermem(row, a.steps, a.threads, "full", fast=True, kv_dtype="bfloat16"),
    "fast-kvf32": lambda row, a: worker_tiermem(row, a.steps, a.threads, "full", fast=True, kv_dtype="float32"),
    "hf": lambda row, a: worker_hf(row, a.steps, a.threads),
    "profile": lambda row, a: worker_profile(row, a.steps, a.threads),
}


def run_clean(system: str, prompts: Path, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_worker`, repeated (up to ``--retries`` times) while other processes took more than ``--max-load``
    of the CPUs during the run: on a shared machine a busy neighbour makes OpenMP's spinning threads wait for each
    other and slows llama.cpp and torch alike by large factors. The run with the least interference is kept."""
    best: dict[str, Any] | None = None
    for attempt in range(args.retries + 1):
        r = run_worker(system, prompts, index, args)
        r["attempt"] = attempt + 1
        if best is None or r["other_cpu_load_during"] < best["other_cpu_load_during"]:
            best = r
        if r["other_cpu_load_during"] <= args.max_load:
            break
        print(
            f"  {system}: other processes took {r['other_cpu_load_during']:.0%} of the CPUs; running again", flush=True
        )
    assert best is not None
    return best


def run_worker(system: str, prompts: Path, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one system on one prompt in a fresh process; its stderr goes to ``bench-out/llamacpp/logs``."""
    python = LLAMACPP_PYTHON if system == "llamacpp" else MAIN_PYTHON
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", system, "--prompts", str(prompts)]
    cmd += ["--index", str(index), "--steps", str(args.steps), "--threads", str(args.threads)]
    busy_before = wait_for_idle(args.wait_idle)
    log = Path(args.out) / "logs" / f"{system}-{index}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    busy0, total0 = cpu_jiffies()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as err:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=thread_env(args.threads), cwd=ROOT
        )
    busy1, total1 = cpu_jiffies()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{system} on prompt {index} failed (exit {proc.returncode}); see {log}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG) :])
    result["process_seconds"] = time.perf_counter() - started
    result["cpu_busy_before"] = busy_before
    # CPU used by everything else while the worker ran, as a fraction of all CPUs (ours subtracted).
    hz = os.sysconf("SC_CLK_TCK")
    ours = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    result["other_cpu_load_during"] = max(0.0, ((busy1 - busy0) / hz - ours) / max((total1 - total0) / hz, 1e-9))
    return result


# ---------------------------------------------------------------------------------------------- report


def markdown(results: list[dict[str, Any]], systems: list[str]) -> str:
    from tiermem.serve.rewind import common_prefix  # here: the llama.cpp worker's venv has no torch

    head = (
        "| prompt tokens | system | prefill tok/s | decode tok/s | decode ms/step | decode steps | peak RSS MiB "
        "| prefill ÷ llama.cpp | decode ÷ llama.cpp | tokens = llama.cpp's | MB read / token | roofline tok/s "
        "| achieved ÷ roofline | other CPU load |"
    )
    lines = [head, "|" + "---|" * 14]
    for length_results in results:
        ref = length_results["systems"].get("llamacpp")
        # The roofline's bandwidth is the machine's (measured by the tiermem workers at the same thread count).
        rates = [r["read_bandwidth_gb_s"] for r in length_results["systems"].values() if "read_bandwidth_gb_s" in r]
        for system in systems:
            r = length_results["systems"][system]
            prefill = r["prompt_tokens"] / r["prefill_seconds"]
            decode = r["decode_steps"] / r["decode_seconds"]
            ratios = ["—", "—", "—"]
            if ref is not None and system != "llamacpp":
                ref_prefill = ref["prompt_tokens"] / ref["prefill_seconds"]
                ref_decode = ref["decode_steps"] / ref["decode_seconds"]
                same = common_prefix(r["token_ids"], ref["token_ids"])
                ratios = [
                    f"{prefill / ref_prefill:.2f}×",
                    f"{decode / ref_decode:.2f}×",
                    f"first {same}/{len(r['token_ids'])}",
                ]
            step_ms = r["decode_seconds"] / r["decode_steps"] * 1e3
            cells = [str(r["prompt_tokens"]), SYSTEMS[system], f"{prefill:.0f}", f"{decode:.1f}", f"{step_ms:.1f}"]
            cells += [str(r["decode_steps"]), f"{r['peak_rss_mib']:.0f}", *ratios]
            cells += roofline_cells(r, max(rates) if rates else None, decode)
            cells.append(f"{r.get('other_cpu_load_during', 0.0):.0%}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def roofline_cells(r: dict[str, Any], bandwidth_gb_s: float | None, decode: float) -> list[str]:
    """MB read per decoded token (weights + KV), the tokens/s that reading alone allows at the measured bandwidth,
    and the achieved share of it."""
    if "bytes_per_token" not in r or not bandwidth_gb_s:
        return ["—", "—", "—"]
    ceiling = bandwidth_gb_s * 1e9 / r["bytes_per_token"]
    return [f"{r['bytes_per_token'] / 1e6:.0f}", f"{ceiling:.0f}", f"{decode / ceiling:.0%}"]


def answer_texts(results: list[dict[str, Any]]) -> list[str]:
    """The greedy answers as text, cut at the first EOS (every run ignored EOS to decode a fixed count)."""
    from tiermem.engine import stop_token_ids
    from tiermem.models import load

    lm = load("smollm2")
    stops = stop_token_ids(lm)
    lines = []
    for length_results in results:
        for system, r in length_results["systems"].items():
            ids = r["token_ids"]
            cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
            text = lm.tokenizer.decode(ids[:cut], skip_special_tokens=True).replace("\n", " ")
            lines.append(f"- {r['prompt_tokens']} tokens, {SYSTEMS[system]}: {text!r} (EOS after {cut} tokens)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8100", help="export_prompts lengths (context tokens, approx.)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=32, help="decode forwards per system after the prefill")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--profile", action="store_true", help="also profile tiermem's decode step at the longest length"
    )
    parser.add_argument(
        "--wait-idle", type=float, default=1800, help="before each run, wait up to this many seconds for other load"
    )
    parser.add_argument("--out", default=str(OUT_DIR), help="folder for prompts, logs and results")
    parser.add_argument("--max-load", type=float, default=0.05, help="rerun when other processes took more CPU")
    parser.add_argument("--retries", type=int, default=3, help="reruns per measurement under --max-load")
    parser.add_argument("--setup-only", action="store_true", help="build .venv-llamacpp and stop")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # inside a child process
        rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        result = WORKERS[args.worker](rows[args.index], args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}: use {','.join(SYSTEMS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "llamacpp" in systems or args.setup_only:
        ensure_llamacpp_venv()
    if args.setup_only:
        print(f"llama-cpp-python {LLAMACPP_VERSION} is ready in {LLAMACPP_VENV}")
        return

    tree = tree_state()
    prompts_path = out_dir / "prompts.jsonl"
    rows = export_prompts(args.lengths, prompts_path)
    results: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        entry: dict[str, Any] = {"length": row["length"], "systems": {}}
        for system in systems:
            r = run_clean(system, prompts_path, index, args)
            entry["systems"][system] = r
            prefill = r["prompt_tokens"] / r["prefill_seconds"]
            print(
                f"{r['prompt_tokens']:>5} tokens  {SYSTEMS[system]:<28} prefill {prefill:7.0f} tok/s"
                f"  decode {r['decode_steps'] / r['decode_seconds']:6.1f} tok/s  peak RSS {r['peak_rss_mib']:5.0f} MiB"
                f"  ({r['process_seconds']:.0f} s, other load {r['other_cpu_load_during']:.0%} of the CPUs)",
                flush=True,
            )
        results.append(entry)

    report = [
        f"## llama.cpp vs tiermem vs HF generate — SmolLM2-135M-Instruct, {args.threads} threads, "
        f"{args.steps} decode forwards, needle prompts (depth 0.5)",
        "",
        f"tiermem tree: {tree}; torch threads / llama.cpp n_threads = {args.threads}; tiermem prefill chunk 512.",
        "",
        markdown(results, systems),
        "",
        "Greedy answers (text up to the first EOS):",
        *answer_texts(results),
    ]
    if "llamacpp" in systems:
        settings = results[0]["systems"]["llamacpp"]["settings"]
        report += ["", f"llama.cpp settings: {json.dumps({k: v for k, v in settings.items() if k != 'system_info'})}"]
        report += [f"llama.cpp system info: {settings['system_info']}"]
    if args.profile:
        longest = max(range(len(rows)), key=lambda i: len(rows[i]["context_ids"]))
        prof = run_clean("profile", prompts_path, longest, args)
        prof["threads"] = args.threads
        (out_dir / "profile.txt").write_text(prof["profiler_table"])
        report += ["", profile_report(prof)]
        results.append({"profile": {k: v for k, v in prof.items() if k != "profiler_table"}})
    text = "\n".join(report)
    print()
    print(text)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    shutil.copy(prompts_path, out_dir / "prompts-used.jsonl")


if __name__ == "__main__":
    main()
