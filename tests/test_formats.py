"""Low-precision weights and KV: round-trip error bounds, kernels against plain references, and every registered
policy on every new weight and KV format (tiny models), compared with float32 within each format's tolerance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import VOCAB, tiny
from tests.test_policy_matrix import covering
from tests.test_policy_matrix import run as matrix_run
from tiermem.errors import TiermemError
from tiermem.formats import cpu_has_bf16
from tiermem.kvstore import ALLOCATORS, make_buffer
from tiermem.kvstore.blocks import StoreConfig
from tiermem.kvstore.dense import KVBuffer
from tiermem.kvstore.quant import KV_DTYPES, kv_format
from tiermem.kvstore.quant_attention import int8_attention
from tiermem.layer_info import describe_layers
from tiermem.memory import REGISTRY, BudgetedPolicy, Policy, build
from tiermem.memory.layer import attention, buffer_attention
from tiermem.weights.fuse import fuse_projections
from tiermem.weights.quant import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_weights,
)

KV_FORMATS = [d for d in KV_DTYPES if d != "auto"]
# Largest |logit - float32 logit| allowed, relative to the largest float32 logit, per KV format. Measured over
# policies on these tiny models (weights of std 0.2 make attention peaked, hence sensitive): bf16 0.019, f16 0.0026,
# int8 0.028 at most (llama; gemma3 about a quarter of that); the bounds leave 2.5-4x headroom.
KV_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2, "int8": 8e-2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", KV_FORMATS)
def test_kv_round_trip_error_bound(name: str) -> None:
    fmt = kv_format(name, torch.float32)
    x = torch.randn(1, 3, 50, 64, generator=gen(0)) * torch.logspace(-3, 2, 50)[None, None, :, None]
    rows = fmt.encode(x)
    assert rows.shape[-1] == fmt.row_width(64) and rows.dtype == fmt.storage_dtype
    back = fmt.decode(rows)
    err = (back - x).abs()
    if name == "int8":  # symmetric absmax per row: half a step of absmax / 127
        bound = x.abs().amax(dim=-1, keepdim=True) / 254 * (1 + 1e-5)
        assert bool((err <= bound).all())
        assert fmt.decode(fmt.encode(back)).equal(back)  # re-encoding decoded rows is exact (compaction safety)
    else:
        info = torch.finfo(fmt.storage_dtype)  # relative rounding, plus float16's subnormal spacing near zero
        assert bool((err <= x.abs() * info.eps + info.smallest_normal * info.eps).all())


def test_int8_rows_carry_their_scale_through_compaction() -> None:
    x = torch.randn(1, 2, 40, 16, generator=gen(1)) * torch.arange(1, 41)[None, None, :, None]
    buf = KVBuffer(2, 16, torch.float32, kv_format="int8")
    buf.append(x, -x, torch.arange(40))
    before = buf.view()[0]
    index = torch.tensor([[3, 30, 7], [39, 0, 12]])  # per head, out of order
    buf.keep(index)
    keys, values, pos = buf.view()
    expected = before.gather(2, index[None, :, :, None].expand(1, -1, -1, 16))
    assert keys.equal(expected) and values.equal(-expected) and pos.equal(index)


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
def test_kv_bytes_are_the_stored_bytes(allocator: str) -> None:
    """int8 rows take D + 4 bytes per head and token (values and scale), bf16 rows 2D: a quarter and a half of
    float32's 4D, plus the same positions."""
    sizes = {}
    for name in ("float32", "bfloat16", "int8"):
        buf = make_buffer(allocator, 3, 64, torch.float32, kv_format=name)
        buf.reserve(4096)
        buf.append(torch.randn(1, 3, 4096, 64), torch.randn(1, 3, 4096, 64), torch.arange(4096))
        positions = buf.positions.numel() * 8
        sizes[name] = buf.nbytes - (positions if allocator != "paged" else 3 * 4096 * 8)
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    assert sizes["int8"] * 4 * 64 == sizes["float32"] * 68


# ---------------------------------------------------------------- kernels


def _info(softcap: float | None = None, window: int | None = None, hq: int = 6, hkv: int = 2, d: int = 32) -> Any:
    model = tiny("llama")
    info = describe_layers(model)[0]
    return dataclasses.replace(
        info, num_heads=hq, num_kv_heads=hkv, head_dim=d, scaling=d**-0.5, softcap=softcap, sliding_window=window
    )


@pytest.mark.parametrize(("softcap", "window", "t"), [(None, None, 1), (None, None, 9), (30.0, None, 5), (None, 20, 7)])
def test_int8_attention_equals_attention_over_decoded_rows(softcap: float | None, window: int | None, t: int) -> None:
    info = _info(softcap, window)
    fmt = kv_format("int8", torch.float32)
    s = 100
    keys = fmt.encode(torch.randn(1, 2, s, 32, generator=gen(2)) * 3)
    values = fmt.encode(torch.randn(1, 2, s, 32, generator=gen(3)))
    q = torch.randn(1, 6, t, 32, generator=gen(4)) * 3
    k_pos, q_pos = torch.arange(s), torch.arange(s - t, s)
    reference = attention(q, fmt.decode(keys), fmt.decode(values), q_pos, k_pos, info)
    for chunk in (None, 16, 33):  # one chunk, and several merged online (uneven last chunk)
        got = int8_attention(q, keys, values, fmt, q_pos, k_pos, info, chunk_tokens=chunk)
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-4)


def _exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, info: Any) -> torch.Tensor:
    """Float64 attention of every query over every key: (1, Hq, T, D)."""
    g = info.num_heads // info.num_kv_heads
    k, v = keys.double().repeat_interleave(g, dim=1), values.double().repeat_interleave(g, dim=1)
    return ((q.double() @ k.transpose(-1, -2)) * info.scaling).softmax(dim=-1) @ v


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_decode_attention_matches_exact(dtype: torch.dtype, tolerance: float) -> None:
    """A decode step (one query) takes the eager path, not SDPA: it must agree with float64 to the dtype's rounding."""
    info = _info()
    keys, values = torch.randn(1, 2, 300, 32, generator=gen(8)), torch.randn(1, 2, 300, 32, generator=gen(9))
    q = torch.randn(1, 6, 1, 32, generator=gen(10)) * 2
    got = attention(q.to(dtype), keys.to(dtype), values.to(dtype), torch.tensor([299]), torch.arange(300), info)
    assert got.dtype == dtype and got.shape == (1, 6, 1, 32)
    exact = _exact_attention(q.to(dtype), keys.to(dtype), values.to(dtype), info)
    assert (got.double() - exact).abs().max().item() < tolerance


def test_int8_decode_in_bfloat16_past_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 decode step over >= HALF_DECODE_MIN_KEYS int8 keys converts them to bf16 (not float32): the result
    differs from the float32 path by bf16 rounding only."""
    info = _info()
    fmt = kv_format("int8", torch.bfloat16)
    keys = fmt.encode(torch.randn(1, 2, 256, 32, generator=gen(11)) * 3)
    values = fmt.encode(torch.randn(1, 2, 256, 32, generator=gen(12)))
    q = (torch.randn(1, 6, 1, 32, generator=gen(13)) * 3).bfloat16()
    k_pos, q_pos = torch.arange(256), torch.tensor([255])
    exact = _exact_attention(q, fmt.decode(keys, torch.float64), fmt.decode(values, torch.float64), info)
    float32_path = int8_attention(q, keys, values, fmt, q_pos, k_pos, info)
    monkeypatch.setattr("tiermem.kvstore.quant_attention.HALF_DECODE_MIN_KEYS", 256)
    half_path = int8_attention(q, keys, values, fmt, q_pos, k_pos, info)
    assert half_path.dtype == torch.bfloat16 and not torch.equal(half_path, float32_path)
    scale = exact.abs().max().item()
    assert (half_path.double() - exact).abs().max().item() < 2e-2 * scale
    assert (float32_path.double() - exact).abs().max().item() < 5e-3 * scale


@pytest.mark.parametrize("name", ["bfloat16", "float16", "int8"])
def test_buffer_attention_reads_the_stored_rows(name: str) -> None:
    info = _info()
    keys, values = torch.randn(1, 2, 64, 32, generator=gen(5)), torch.randn(1, 2, 64, 32, generator=gen(6))
    buf = KVBuffer(2, 32, torch.float32, kv_format=name)
    buf.append(keys, values, torch.arange(64))
    q = torch.randn(1, 6, 1, 32, generator=gen(7))
    exact = attention(q, keys, values, torch.tensor([63]), torch.arange(64), info)
    got = buffer_attention(q, buf, torch.tensor([63]), info)
    assert got.dtype == torch.float32
    assert (got - exact).abs().max().item() < 2e-2 * exact.abs().max().item()


# ---------------------------------------------------------------- weights


def test_int8_weights_error_bound_and_kernel() -> None:
    linear = nn.Linear(96, 40, bias=True)
    q, scales = quantize_int8(linear.weight)
    deq = q.float() * scales[:, None]
    assert bool(((deq - linear.weight).abs() <= scales[:, None] / 2 * (1 + 1e-5)).all())
    x = torch.randn(2, 5, 96, generator=gen(8))
    got = Int8WeightOnlyLinear(linear)(x)
    torch.testing.assert_close(got, x @ deq.T + linear.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("k", "group"), [(128, 32), (96, 64), (640, 128)])
def test_int4_weights_error_bound_and_kernel(k: int, group: int) -> None:
    linear = nn.Linear(k, 48, bias=False)
    layer = Int4WeightOnlyLinear(linear, group)
    padded = torch.nn.functional.pad(linear.weight.detach(), (0, layer.padded_in - k))
    q, scales, zeros = quantize_int4(padded, group)
    deq = dequantize_int4(q, scales, zeros, group)
    step = scales.repeat_interleave(group, dim=1)
    assert bool(((deq - padded).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all())
    x = torch.randn(3, k, generator=gen(9))
    torch.testing.assert_close(layer(x), x @ deq[:, :k].T, atol=1e-3, rtol=1e-3)


def test_quantize_weights_swaps_every_linear() -> None:
    model = tiny("llama")
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    report = quantize_weights(model, "int8")
    assert report.modules == linears and not any(isinstance(m, nn.Linear) for m in model.modules())
    assert report.bytes_after < report.bytes_before / 3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantize_weights(tiny("llama"), "int3"), "unknown weight quantization 'int3'"),
        (lambda: quantize_weights(tiny("llama"), "int4", 48), "int4 group size must be one of"),
        (lambda: quantize_weights(tiny("llama").half(), "int8"), "needs --dtype float32 or bfloat16"),
        (lambda: kv_format("int4", torch.float32), "unknown KV dtype 'int4'"),
        (lambda: StoreConfig(kv_dtype="fp8"), "unknown KV dtype 'fp8'"),
    ],
)
def test_bad_values_are_one_line_errors(call: Any, message: str) -> None:
    with pytest.raises(TiermemError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- every policy on every format


def run(model: nn.Module, policy: Policy, ids: torch.Tensor, context: int, kv_dtype: str) -> tuple[Any, int]:
    """tests/test_policy_matrix.py's teacher-forced run (16-token prefill chunks) with KV rows stored as
    ``kv_dtype``: logits of every position (T, vocab) and the KV bytes held at the end."""
    logits, (cache, _) = matrix_run(model, policy, ids, context, 16, StoreConfig(kv_dtype=kv_dtype))
    kv = cache.kv_bytes()
    cache.close()
    return logits, kv


def check_close(got: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """Logits within ``tolerance`` x the largest reference logit, and the same greedy token wherever the reference's
    top two are further apart than twice the allowed error."""
    allowed = tolerance * reference.abs().max().item()
    assert torch.isfinite(got).all()
    assert (got - reference).abs().max().item() <= allowed
    top = reference.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * allowed
    assert got.argmax(-1)[clear].equal(reference.argmax(-1)[clear])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_policy_on_every_kv_format(name: str, arch: str) -> None:
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (1, 50), generator=gen(1))
    reference, ref_bytes = run(model, covering(name, model, 45, 50), ids, 45, "float32")
    for kv in KV_FORMATS[1:]:
        got, kv_bytes = run(model, covering(name, model, 45, 50), ids, 45, kv)
        check_close(got, reference, KV_TOLERANCE[kv])
        assert kv_bytes <= ref_bytes


def dequantized(model: nn.Module, mode: str) -> nn.Module:
    """``model`` with every Linear weight replaced by the float values its ``mode`` codes stand for: the exact
    reference for the quantized kernels (on random tiny weights, 4 bits are far from the float model itself)."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            w = module.weight
            if mode == "int8" or module is head:  # int4 keeps the LM head at int8
                q, scales = quantize_int8(w)
                module.weight = nn.Parameter(q.float() * scales[:, None])
            else:
                q, scales, zeros = quantize_int4(w, 32)  # tiny models' widths are multiples of 32
                module.weight = nn.Parameter(dequantize_int4(q, scales, zeros, 32))
    return model


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_policy_on_every_weight_format(name: str, mode: str) -> None:
    """Weight-only int8 and int4 (group 32), projections fused as the loader fuses them, under each policy equal the
    float model holding the dequantized weights; int4 runs with int8 KV too (the smallest pair), within int8 KV's
    tolerance."""
    ids = torch.randint(0, VOCAB, (1, 50), generator=gen(1))
    reference_model = dequantized(tiny("llama"), mode)
    reference, _ = run(reference_model, covering(name, reference_model, 45, 50), ids, 45, "float32")
    model = tiny("llama")
    quantize_weights(model, mode)
    assert fuse_projections(model, torch.float32) > 0  # as the loader does: the fused paths run under every policy
    kv = "int8" if mode == "int4" else "float32"
    got, _ = run(model, covering(name, model, 45, 50), ids, 45, kv)
    check_close(got, reference, KV_TOLERANCE[kv] if kv == "int8" else 1e-4)


BUDGETED = [name for name, entry in REGISTRY.items() if issubclass(entry.cls, BudgetedPolicy)]


@pytest.mark.parametrize("name", BUDGETED)
def test_budgeted_policies_evict_int8_rows(name: str) -> None:
    """Below the context, eviction and compaction move int8 rows: logits stay finite and the run holds at most
    about a quarter of float32's bytes for the hot buffers (more where a policy keeps float state beside them)."""
    model = tiny("llama")
    budget = build(name, kv_budget=4096).fixed_tokens() + 24
    context = 2 * budget + 40
    ids = torch.randint(0, VOCAB, (1, context + 4), generator=gen(2))
    _, ref_bytes = run(model, build(name, kv_budget=budget), ids, context, "float32")
    got, kv_bytes = run(model, build(name, kv_budget=budget), ids, context, "int8")
    assert torch.isfinite(got).all()
    assert kv_bytes < 0.5 * ref_bytes


# ---------------------------------------------------------------- the command line


def test_generate_reports_the_formats_that_ran(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    from tests.test_cli import run_cli

    base = ["generate", "--model", str(tiny_model_dir), "--context", "The pass key is 4321. " * 10]
    code, out, _ = run_cli(capsys, *base, "--policy", "full", "--max-new-tokens", "3", "--json", "--formats", "exact")
    assert code == 0
    extra = json.loads(out)["extra"]
    assert (extra["weights_format"], extra["kv_dtype"]) == ("float32", "float32")
    code, out, _ = run_cli(capsys, *base, "--policy", "full", "--max-new-tokens", "3", "--json")  # --formats fast
    assert code == 0
    extra = json.loads(out)["extra"]
    # A float checkpoint has no 4-bit layers: fast takes int8 weights (where the CPU has bfloat16).
    fast = ("int8", "bfloat16", "int8") if cpu_has_bf16() else ("float32", "float32", "float32")
    assert (extra["weights_format"], extra["compute_dtype"], extra["kv_dtype"]) == fast
    flags = ["--dtype", "bfloat16", "--weights-quant", "int4", "--kv-dtype", "int8", "--policy", "full"]
    code, out, _ = run_cli(capsys, *base, *flags, "--max-new-tokens", "3", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["extra"]["weights_format"] == "int4-g32"
    assert record["extra"]["compute_dtype"] == "bfloat16" and record["extra"]["kv_dtype"] == "int8"
    code, out, err = run_cli(capsys, *base, *flags, "--max-new-tokens", "3")
    assert code == 0 and "[formats] weights int4-g32, activations bfloat16, KV int8" in out + err


def test_bad_format_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    from tests.test_cli import assert_one_line_error, run_cli

    base = ["generate", "--model", str(tiny_model_dir), "--context", "hello"]
    code, _, err = run_cli(capsys, *base, "--kv-dtype", "int4")
    assert_one_line_error(code, err, "--kv-dtype")
    code, _, err = run_cli(capsys, *base, "--weights-quant", "int8", "--weights", "stream")
    assert_one_line_error(code, err, "needs --weights resident")
    code, _, err = run_cli(capsys, *base, "--weights-quant", "int8", "--dtype", "float16")
    assert_one_line_error(code, err, "needs --dtype float32 or bfloat16")


def test_rope_of_a_query_key_pair_equals_two_rotations() -> None:
    """A decode step rotates its queries and keys as one tensor (tiermem.rope.apply_rope_pair): the same bits."""
    from tiermem.rope import apply_rope, apply_rope_pair

    generator = torch.Generator().manual_seed(0)
    for dtype, t in [(torch.bfloat16, 1), (torch.float32, 1), (torch.bfloat16, 3)]:
        q, k = (torch.randn(1, h, t, 64, generator=generator).to(dtype) for h in (9, 3))
        angles = torch.randn(t, 32, generator=generator).repeat(1, 2)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        pair = apply_rope_pair(q, k, cos, sin)
        assert torch.equal(pair[0], apply_rope(q, cos, sin)) and torch.equal(pair[1], apply_rope(k, cos, sin))
