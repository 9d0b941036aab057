"""Weights larger than the limit: tiermem's layer streaming beside HF accelerate disk offload and AirLLM, on CPU.

    .venv/bin/python benchmarks/weight_offload.py --model-dir /tmp/llama-1.1b-random --limit 1GB \
        --prompt-tokens 512 --new-tokens 32 --systems tiermem-resident,tiermem-stream,accelerate,airllm \
        --out bench-out/weight_offload.jsonl

The model folder comes from ``benchmarks/make_random_llama.py``. Each system runs once, in its own subprocess (so
peak RSS does not mix), on the same prompt: ``--prompt-tokens`` ids drawn by ``prompt_ids`` (``random.Random(seed)``,
uniform in [256, vocab)), then ``--new-tokens`` greedy tokens with EOS ignored. Recorded per system: load seconds (for
AirLLM also ``prepare_s``, its one-off re-split of the checkpoint into per-layer files), prefill seconds (call start to
first token), decode seconds (first to last token), tokens/s = new tokens / (prefill + decode) as FlexGen defines
throughput, decode-only tokens/s, peak RSS (VmHWM from /proc/self/status; reset via /proc/self/clear_refs after
loading so the load and generate peaks are separate), the generated ids and each step's top-1 minus top-2 logit
margin (random weights give small margins, so a token mismatch at a near-tie is noise, not a bug).

Systems:
  tiermem-stream       ``tiermem.models.load(dir, weights="stream", StreamConfig(weight_memory=LIMIT))``: decoder
              layers memory-mapped per layer, k layers populated ahead by a loader thread, dropped with
              MADV_DONTNEED (the per-layer copy of the checkpoint is made once under $TIERMEM_CACHE before timing).
  tiermem-stream-read  the same with ``loader="read"``: each layer copied into one of k preallocated slots.
  tiermem-resident     every weight in RAM, tiermem's engine: the token reference for the streamed runs.
  tiermem prefills the prompt in one 512-token chunk (``--chunk-size``), with the ``full`` KV policy.
  accelerate  ``AutoModelForCausalLM.from_pretrained(dir, device_map="auto", max_memory={"cpu": LIMIT},
              offload_folder=tmp, dtype=float32)``; modules that do not fit LIMIT go to "disk". On a CPU-only machine
              the disk modules are read from the checkpoint's own safetensors files (nothing is written to
              offload_folder) one leaf module (Linear, norm) at a time in a forward pre-hook, which re-opens the file
              and takes a zero-copy mmap view (safetensors 0.8 ``get_tensor``), and dropped to "meta" after it.
              accelerate keeps room for the largest layer inside LIMIT, and once one module spills to disk all later
              ones do too: at 1GB on the 1.1b preset, embeddings (tied lm_head) and layers 0-1 stay in RAM, layers
              2-21 and the final norm go to disk. Below the embedding's size the whole model goes to disk.
  airllm      ``airllm.AutoModel.from_pretrained(dir, device="cpu", dtype=float32)`` run by ``--airllm-python``
              (a separate venv: ``python3.11 -m venv .venv-airllm; .venv-airllm/bin/pip install torch==2.13.0;
              .venv-airllm/bin/pip install airllm==4.0.0 psutil transformers==5.24.0``). It streams every decoder
              layer from per-layer files each forward; with tied embeddings the embedding stays resident. LIMIT
              does not apply to it. After every streamed module AirLLM calls ``clean_memory()`` (gc.collect +
              malloc_trim + cuda.empty_cache); on CPU the full gc pass dominates small models.
  airllm-nogc AirLLM with ``clean_memory`` patched to a no-op: what its streaming costs without that gc pass.
  full        plain ``from_pretrained`` with everything in RAM: the no-offload upper bound and token reference.

``--cgroup-memory 1536MB`` runs each system in a cgroup-v1 memory group of that size (RSS and page cache
together, as on a machine with that much RAM): the model cannot stay in the page cache, so its bytes come from disk
on every pass. Combine it with ``--cold``: pages cached before the run stay charged to the group that read them, so
without it the limit does not bind. ``--cold`` evicts the model's files from the page cache (posix_fadvise
DONTNEED, only those files) before each system; without it, "disk" reads after the first pass come from the page
cache. Results are appended as JSON lines to ``--out``; a system that fails is recorded with ``ok: false`` and its
error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _offload_loaders import evict_page_cache, load_accelerate, load_airllm, load_full, proc_status, reset_peak_rss

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "WEIGHT_OFFLOAD_RESULT "
PROMPT_LOW_ID = 256
TIERMEM_SYSTEMS = ("tiermem-resident", "tiermem-stream", "tiermem-stream-read")
SYSTEMS = (*TIERMEM_SYSTEMS, "accelerate", "airllm", "airllm-nogc", "full")
AIRLLM_SYSTEMS = ("airllm", "airllm-nogc")


def prompt_ids(vocab_size: int, count: int, seed: int = 0) -> list[int]:
    """The benchmark prompt: ``count`` ids uniform in [256, vocab_size), from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [rng.randrange(PROMPT_LOW_ID, vocab_size) for _ in range(count)]


# ----------------------------------------------------------------------------------------------------------- worker


def _versions(system: str) -> dict[str, str]:
    import importlib.metadata as md

    names = ["torch", "transformers", "accelerate", "safetensors"] + (["airllm"] if system in AIRLLM_SYSTEMS else [])
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def run_tiermem(args: argparse.Namespace, ids: list[int]) -> dict[str, Any]:
    """tiermem's engine on the same ids: resident weights, or streamed ones under ``--limit``."""
    import torch

    from tiermem.engine import GenerationConfig, generate
    from tiermem.memory.full import Full
    from tiermem.models import load
    from tiermem.prompts import Prompt
    from tiermem.units import parse_size
    from tiermem.weights.stream import StreamConfig

    start = time.perf_counter()
    if args.worker == "tiermem-resident":
        lm = load(str(args.model_dir))
    else:
        loader = "read" if args.worker == "tiermem-stream-read" else "mmap"
        stream = StreamConfig(weight_memory=parse_size(args.limit), loader=loader)
        lm = load(str(args.model_dir), weights="stream", stream=stream)
    result: dict[str, Any] = {"load_s": time.perf_counter() - start}
    result["rss_after_load_mib"] = proc_status()["VmRSS"] / 1024
    result["peak_rss_load_mib"] = proc_status()["VmHWM"] / 1024
    prompt = Prompt(torch.tensor([ids]), torch.tensor([ids[:0]], dtype=torch.long).reshape(1, 0), "completion")
    config = GenerationConfig(max_new_tokens=args.new_tokens, chunk_size=args.chunk_size, stop_on_eos=False)
    out = generate(lm, prompt, Full(), config)  # resets the peak RSS itself before prefill
    after = proc_status()
    stats = out.stats
    lm.close()
    generated = out.token_ids
    result.update(
        {
            "prefill_s": stats.prefill_seconds,
            "decode_s": stats.decode_seconds,
            "generated_tokens": len(generated),
            "tokens_per_s": len(generated) / (stats.prefill_seconds + stats.decode_seconds),
            "decode_tokens_per_s": stats.decode_tokens_per_second,
            "peak_rss_generate_mib": stats.peak_rss_bytes / 2**20,
            "rss_anon_end_mib": after["RssAnon"] / 1024,
            "rss_file_end_mib": after["RssFile"] / 1024,
            "generated_ids": generated,
            "weights": stats.extra,
        }
    )
    result["peak_rss_mib"] = max(result["peak_rss_load_mib"], result["peak_rss_generate_mib"])
    return result


def prepare_tiermem(model_dir: Path) -> float:
    """Make tiermem's per-layer copy of the checkpoint once, outside the timed runs; returns its seconds."""
    import torch

    from tiermem.models import cache_root
    from tiermem.weights.stream import StreamConfig, load_streamed

    start = time.perf_counter()
    load_streamed(model_dir, torch.float32, StreamConfig(prefetch_layers=1), cache_root() / "layers").close()
    return time.perf_counter() - start


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Timestamps each ``put``: the first is the prompt, each later one a new token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    ids = prompt_ids(config["vocab_size"], args.prompt_tokens, args.seed)

    if args.worker in TIERMEM_SYSTEMS:
        return {"versions": _versions(args.worker), "threads": torch.get_num_threads()} | run_tiermem(args, ids)
    result: dict[str, Any] = {"versions": _versions(args.worker), "threads": torch.get_num_threads()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="offload-", dir=args.tmp_dir) as offload_dir:
        if args.worker == "accelerate":
            model, info = load_accelerate(model_dir, args.limit, offload_dir)
        elif args.worker == "full":
            model, info = load_full(model_dir)
        else:
            split_dir = Path(args.airllm_split_dir) if args.airllm_split_dir else None
            model, info, result["prepare_s"] = load_airllm(model_dir, split_dir, args.worker == "airllm-nogc")
        result["load_s"] = time.perf_counter() - start - result.get("prepare_s", 0.0)
        result.update(info)
        after_load = proc_status()
        result["peak_rss_load_mib"] = after_load["VmHWM"] / 1024
        result["rss_after_load_mib"] = after_load["VmRSS"] / 1024
        result["peak_reset"] = reset_peak_rss()

        input_ids = torch.tensor([ids], dtype=torch.long)
        clock = Clock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=config.get("pad_token_id") or config.get("eos_token_id") or 0,
                streamer=clock,
                return_dict_in_generate=True,
                output_scores=True,
            )
            t_end = time.perf_counter()
        after = proc_status()

    generated = out.sequences[0, input_ids.shape[1] :].tolist()
    margins = []
    for step_scores in out.scores:
        top = torch.topk(step_scores[0].float(), 2).values
        margins.append(round(float(top[0] - top[1]), 5))
    first_token_at = clock.times[1] if len(clock.times) > 1 else t_end
    prefill_s = first_token_at - t0
    decode_s = t_end - first_token_at
    result.update(
        {
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "generated_tokens": len(generated),
            "tokens_per_s": len(generated) / (prefill_s + decode_s),
            "decode_tokens_per_s": (len(generated) - 1) / decode_s if decode_s > 0 else None,
            "peak_rss_generate_mib": after["VmHWM"] / 1024,
            "rss_anon_end_mib": after["RssAnon"] / 1024,
            "rss_file_end_mib": after["RssFile"] / 1024,
            "generated_ids": generated,
            "top2_margins": margins,
        }
    )
    result["peak_rss_mib"] = max(result["peak_rss_load_mib"], result["peak_rss_generate_mib"])
    return result


# ----------------------------------------------------------------------------------------------------------- parent


def worker_command(system: str, args: argparse.Namespace) -> list[str]:
    python = str(args.airllm_python) if system in AIRLLM_SYSTEMS else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", system, "--model-dir", str(args.model_dir)]
    cmd += ["--limit", args.limit, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads), "--chunk-size", str(args.chunk_size)]
    if args.cold:
        cmd += ["--cold"]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    if args.airllm_split_dir:
        cmd += ["--airllm-split-dir", args.airllm_split_dir]
    return cmd


CGROUP = Path("/sys/fs/cgroup/memory/tiermem-bench")


def in_memory_cgroup(cmd: list[str], limit: str) -> list[str]:
    """Run ``cmd`` in a cgroup-v1 memory group capped at ``limit`` (RSS and page cache together): a machine
    with that much RAM, where a model larger than it cannot sit in the page cache between tokens. Needs root."""
    from tiermem.units import parse_size

    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(str(parse_size(limit)))
    (CGROUP / "memory.force_empty").write_text("0")  # drop what an earlier run left charged to the group
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *cmd]


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    record: dict[str, Any] = {
        "system": system,
        "model_dir": str(args.model_dir),
        "limit": args.limit if system in ("accelerate", "tiermem-stream", "tiermem-stream-read") else None,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "seed": args.seed,
        "page_cache": "cold" if args.cold else "warm",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host_cpus": os.cpu_count(),
    }
    index = Path(args.model_dir) / "model.safetensors.index.json"
    if index.is_file():
        record["checkpoint_bytes"] = json.loads(index.read_text()).get("metadata", {}).get("total_size")
    if args.cold:
        record["evicted_bytes"] = evict_page_cache(Path(args.model_dir))
        if args.airllm_split_dir:
            record["evicted_bytes"] += evict_page_cache(Path(args.airllm_split_dir))
        if system in TIERMEM_SYSTEMS:
            from tiermem.models import cache_root

            record["evicted_bytes"] += evict_page_cache(cache_root() / "layers")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    cmd = worker_command(system, args)
    if args.cgroup_memory:
        cmd = in_memory_cgroup(cmd, args.cgroup_memory)
        record["cgroup_memory"] = args.cgroup_memory
    if system in AIRLLM_SYSTEMS and not Path(cmd[0]).exists():
        return record | {"ok": False, "error": f"AirLLM python {cmd[0]} not found (see --airllm-python)"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    record["wall_s"] = time.perf_counter() - start
    payload = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not payload:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-25:]
        return record | {"ok": False, "returncode": proc.returncode, "error": "\n".join(tail)}
    return record | {"ok": True} | json.loads(payload[-1][len(RESULT_PREFIX) :])


def print_table(records: list[dict[str, Any]]) -> None:
    print("| system | load s | prefill s | decode s | tok/s | decode tok/s | peak RSS MiB (load/gen) | first ids |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        if not r.get("ok"):
            first_line = (r.get("error") or "").strip().splitlines()[-1:] or ["?"]
            print(f"| {r['system']} | failed: {first_line[0][:100]} |||||||")
            continue
        load = r["load_s"] + r.get("prepare_s", 0.0)
        decode_tps = r["decode_tokens_per_s"] or 0.0
        print(
            f"| {r['system']} | {load:.1f} | {r['prefill_s']:.2f} | {r['decode_s']:.2f} | {r['tokens_per_s']:.3f} "
            f"| {decode_tps:.3f} | {r['peak_rss_mib']:.0f} ({r['peak_rss_load_mib']:.0f}/"
            f"{r['peak_rss_generate_mib']:.0f}) | {r['generated_ids'][:6]} |"
        )
    done = [r for r in records if r.get("ok")]
    if len(done) > 1:
        ref = done[0]["generated_ids"]
        for r in done[1:]:
            same = sum(a == b for a, b in zip(ref, r["generated_ids"], strict=False))
            print(f"{r['system']} vs {done[0]['system']}: {same}/{len(ref)} generated ids equal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--limit", default="1GB", help="accelerate max_memory for cpu; the rest goes to disk")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--systems", default="accelerate,airllm")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every system")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "offload_baselines.jsonl")
    parser.add_argument("--airllm-python", type=Path, default=REPO / ".venv-airllm" / "bin" / "python")
    parser.add_argument("--airllm-split-dir", default=None, help="where AirLLM writes its per-layer split")
    parser.add_argument("--tmp-dir", default=None, help="parent of accelerate's offload_folder")
    parser.add_argument("--cold", action="store_true", help="evict the model files from the page cache first")
    parser.add_argument("--chunk-size", type=int, default=512, help="tiermem's prefill chunk")
    parser.add_argument("--cgroup-memory", help="run each system in a memory cgroup of this size (RAM + page cache)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per system")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_worker(args)), flush=True)
        return

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if any(s.startswith("tiermem-stream") for s in systems):
        print(f"tiermem per-layer copy ready in {prepare_tiermem(args.model_dir):.1f} s", flush=True)
    records = []
    for system in systems:
        print(f"running {system} ...", flush=True)
        record = run_system(system, args)
        records.append(record)
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")
    print(f"{args.model_dir}: {args.prompt_tokens} prompt + {args.new_tokens} new tokens, threads {args.threads}")
    print_table(records)
    print(f"appended {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
