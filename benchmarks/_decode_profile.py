"""Where one tiermem ``full`` decode step goes (``llamacpp_compare.py --profile``): wall time, isolated linear and
attention timings, torch profiler ops, read bandwidth; and its markdown report."""

from __future__ import annotations

import time
from typing import Any

from _decode_workers import read_bandwidth_gb_s


def worker_profile(row: dict[str, Any], steps: int, threads: int) -> dict[str, Any]:
    """Where one tiermem ``full`` decode step goes at this prompt length.

    Three views: (a) wall time per decode forward; (b) the same 30 layers' linear layers plus the LM head run alone on
    one token, and SDPA over the real KV shapes run alone (isolated micro-timings); (c) torch.profiler self-CPU time
    per op over ``steps`` decode forwards, grouped; wall minus the sum of op times is Python/dispatch overhead.
    """
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from tiermem.attention import patched_attention
    from tiermem.cache import TierCache
    from tiermem.engine import forward, prefill
    from tiermem.memory import build
    from tiermem.models import load

    torch.set_num_threads(threads)
    lm = load("smollm2")
    model = lm.model
    ids = torch.tensor([row["context_ids"] + row["question_ids"]])
    n = ids.shape[1]
    cache = TierCache(model, build("full"))
    cache.plan(n, n + 2 * steps + 8)
    with torch.inference_mode(), patched_attention(model):
        logits = prefill(model, cache, ids, 512)
        assert logits is not None
        token = int(logits.argmax())
        for _ in range(3):  # warm-up decode steps
            token = int(forward(model, cache, torch.tensor([[token]])).argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            token = int(forward(model, cache, torch.tensor([[token]])).argmax())
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                token = int(forward(model, cache, torch.tensor([[token]])).argmax())
            profiled_ms = (time.perf_counter() - t0) / steps * 1e3
        kv_len = cache.kv_tokens()

    # (b) isolated micro-timings on the real shapes and the real (DRAM-resident) weights and KV of every layer
    cfg = model.config
    linears: list[Any] = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    linears.append(model.lm_head)
    x = torch.randn(1, 1, cfg.hidden_size)
    xi = torch.randn(1, 1, cfg.intermediate_size)

    def time_ms(fn: Any, reps: int = 20) -> float:
        with torch.inference_mode():
            for _ in range(3):
                fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
        return (time.perf_counter() - t) / reps * 1e3

    def linears_ms(weights: list[Any], dtype: Any) -> float:
        xs, xis = x.to(dtype), xi.to(dtype)
        return time_ms(lambda: [F.linear(xis if w.shape[1] == cfg.intermediate_size else xs, w) for w in weights])

    fp32_weights = [m.weight for m in linears]
    bf16_weights = [w.to(torch.bfloat16) for w in fp32_weights]
    linears_fp32 = linears_ms(fp32_weights, torch.float32)
    linears_bf16 = linears_ms(bf16_weights, torch.bfloat16)
    try:  # int8 weights, dynamic int8 activations (fbgemm): a stand-in for a quantized GEMV
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain: Any = torch.nn.ModuleList(
                torch.nn.Linear(m.in_features, m.out_features, bias=False) for m in linears
            )
            for dst, src in zip(plain, linears, strict=True):
                dst.weight.data.copy_(src.weight)
            qmods: Any = quantize_dynamic(plain, {torch.nn.Linear}, dtype=torch.qint8)
        linears_int8: float | None = time_ms(
            lambda: [m(xi if m.in_features == cfg.intermediate_size else x) for m in qmods]
        )
    except Exception:  # quantize_dynamic is deprecated and may be missing
        linears_int8 = None

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    kvs = [layer.buffer.view()[:2] for layer in cache.tier_layers]  # the cache's own (strided) views, per layer
    q = torch.randn(1, heads, 1, head_dim)

    def attention_ms(pairs: list[tuple[torch.Tensor, torch.Tensor]], dtype: Any) -> float:
        qd = q.to(dtype)
        return time_ms(lambda: [F.scaled_dot_product_attention(qd, k, v, enable_gqa=True) for k, v in pairs], reps=10)

    def grouped_matmul() -> None:  # GQA as a grouped matmul + softmax, no copy of K/V
        g = q.view(1, kv_heads, heads // kv_heads, head_dim)
        for k, v in kvs:
            (g @ k.transpose(-1, -2) * head_dim**-0.5).softmax(-1) @ v

    attention_fp32 = attention_ms(kvs, torch.float32)
    kvs_bf16 = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in kvs]
    attention_bf16 = attention_ms(kvs_bf16, torch.bfloat16)
    grouped_fp32 = time_ms(grouped_matmul, reps=10)

    bandwidth = read_bandwidth_gb_s(threads)  # the roofline column's measurement, so the two reports agree

    events = prof.key_averages()
    total_self_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    groups = {
        "linear (aten::addmm/mm/linear)": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"),
        "attention (aten::*scaled_dot_product*)": ("scaled_dot_product",),
        "KV append / copies (aten::copy_, index, slice)": ("aten::copy_", "aten::index", "aten::slice", "aten::select"),
    }
    grouped: dict[str, float] = {}
    for e in events:
        name = "other ops (rope, norms, elementwise, sampling)"
        for label, keys_ in groups.items():
            if any(k in e.key for k in keys_):
                name = label
                break
        grouped[name] = grouped.get(name, 0.0) + e.self_cpu_time_total / 1e3 / steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {
        "prompt_tokens": n,
        "kv_tokens": kv_len,
        "decode_step_ms": step_ms,
        "decode_step_ms_under_profiler": profiled_ms,
        "profiler_ops_ms_per_step": grouped,
        "profiler_total_op_self_ms_per_step": total_self_ms,
        "python_and_dispatch_overhead_ms_per_step": profiled_ms - total_self_ms,
        "isolated_linears_plus_lm_head_ms": {"fp32": linears_fp32, "bf16": linears_bf16, "int8_dynamic": linears_int8},
        "isolated_sdpa_over_kv_ms": {
            "fp32": attention_fp32,
            "bf16": attention_bf16,
            "fp32_grouped_matmul": grouped_fp32,
        },
        "read_bandwidth_gb_s": bandwidth,
        "weights_bytes_fp32": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_bytes_fp32": cache.kv_bytes(),
        "profiler_table": table,
    }


def profile_report(p: dict[str, Any]) -> str:
    lines = [
        f"### tiermem full: one decode step at {p['prompt_tokens']} prompt tokens (KV {p['kv_tokens']} tokens/layer)",
        "",
        f"- wall per decode forward: {p['decode_step_ms']:.1f} ms "
        f"({p['decode_step_ms_under_profiler']:.1f} ms under the profiler)",
        "- isolated, all 30 layers' linear layers + LM head on one token: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in p["isolated_linears_plus_lm_head_ms"].items() if v is not None),
        "- isolated, SDPA (enable_gqa) of one query over every layer's KV: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in p["isolated_sdpa_over_kv_ms"].items()),
        f"- bytes per step: fp32 weights {p['weights_bytes_fp32'] / 2**20:.0f} MiB, "
        f"fp32 KV {p['kv_bytes_fp32'] / 2**20:.0f} MiB; "
        f"streaming read bandwidth (torch sum of 512 MiB, best of 6, {p.get('threads', '')} threads): "
        f"{p['read_bandwidth_gb_s']:.1f} GB/s",
        "- profiler, self CPU ms per step: "
        + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(p["profiler_ops_ms_per_step"].items(), key=lambda kv: -kv[1])),
        f"- sum of op self times {p['profiler_total_op_self_ms_per_step']:.1f} ms/step; wall minus that (Python, "
        f"dispatch, hooks): {p['python_and_dispatch_overhead_ms_per_step']:.1f} ms/step",
        "",
        "```",
        p["profiler_table"],
        "```",
    ]
    return "\n".join(lines)
