"""The fused decode step (tiermem.decode_step, csrc/decode_step.cpp): the Python step's logits and stored rows within
bf16 rounding, on the vectorized (head_dim 64) and plain (head_dim 32) attention paths, int4 and int8 weights, int8
and bf16 KV; a cache it filled reads on in Python; it steps aside, saying why, where it does not apply."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import sharpen
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.decode_step import fused_decoder
from tiermem.engine import GenerationConfig, forward_token, generate, prefill
from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import build
from tiermem.models import LoadedModel
from tiermem.native import decode_extension
from tiermem.norms import fuse_norms
from tiermem.prompts import Prompt
from tiermem.weights.fuse import QKV, fuse_projections
from tiermem.weights.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_weights

pytestmark = pytest.mark.skipif(decode_extension()[0] is None, reason=decode_extension()[1] or "no extension")
TOLERANCE = 0.15  # of the logits' largest magnitude, fused against Python: measured up to 0.04 on these tiny
# random models (0.01 on SmolLM2); one position off measures 0.84


def _lm(mode: str = "int4", head_dim: int = 64, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """A tiny Llama quantized and fused as tiermem's loader does (rows in whole 64-row blocks for int4 fusion)."""
    torch.manual_seed(0)
    heads = 128 // head_dim
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=1024,
    )
    model = sharpen(LlamaForCausalLM(cfg))
    model = model.to(dtype)
    if dtype == torch.bfloat16:
        quantize_weights(model, mode)
        fuse_projections(model, dtype)
        fuse_norms(model)
    return LoadedModel(name="tiny", model=model, tokenizer=None, source=Path("."))  # type: ignore[arg-type]


def _widened(lm: LoadedModel) -> LoadedModel:
    """The same quantized weights widened to float32 plain Linears: the reference both steps approximate."""
    ref = copy.deepcopy(lm.model)
    for parent in list(ref.modules()):
        parent.__dict__.pop("forward", None)  # fused MLPs and one-call norms back to transformers' forwards
        parent.__dict__.pop(QKV, None)
        for name, child in list(parent.named_children()):
            if isinstance(child, Int4WeightOnlyLinear):
                weight = child.dequantized(torch.float32)[:, : child.in_features]
            elif isinstance(child, Int8WeightOnlyLinear):
                weight = child.weight.float() * child.scales[:, None].float()
            else:
                continue
            plain = nn.Linear(child.in_features, child.out_features, bias=False)
            plain.weight.data = weight
            setattr(parent, name, plain)
    return LoadedModel(name="reference", model=ref.float(), tokenizer=None, source=Path("."))  # type: ignore[arg-type]


def _prefilled(lm: LoadedModel, kv: str, policy: str = "full", tokens: int = 150, room: int = 16) -> TierCache:
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(1))
    options = {"kv_budget": 64} if policy != "full" else {}
    cache = TierCache(lm.model, build(policy, **options), StoreConfig(kv_dtype=kv))
    cache.plan(tokens, tokens + room, 64)
    with torch.inference_mode(), patched_attention(lm.model):
        prefill(lm.model, cache, ids, 64)
        cache.end_context()
    return cache


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize(
    ("mode", "head_dim", "kv"), [("int4", 64, "int8"), ("int8", 64, "bfloat16"), ("int4", 32, "int8")]
)
def test_fused_steps_match_the_python_step(mode: str, head_dim: int, kv: str) -> None:
    """Both steps against float32 over the same quantized weights: the fused one no further off (it rounds less),
    close to the Python step, and the rows it stores read back as the Python step's."""
    lm = _lm(mode, head_dim)
    reference = _widened(lm)
    python = _prefilled(lm, kv, room=4)  # room for 4: the fused cache must grow its blocks on the way
    fused = copy.deepcopy(python)
    ref_cache = _prefilled(reference, "float32", room=4)
    python_error, fused_error = [], []
    with torch.inference_mode():
        decoder, why = fused_decoder(lm, [fused])
        assert decoder is not None, why
        for token in (5, 17, 99, 3, 64, 8, 120, 1):  # 8 steps: more than the room planned
            with patched_attention(reference.model):
                want = forward_token(reference.model, ref_cache, token)
            with patched_attention(lm.model):
                theirs = forward_token(lm.model, python, token)
            ours = decoder.step([fused], [token])[0]
            assert _relative(theirs, ours) < TOLERANCE
            python_error.append(_relative(want, theirs))
            fused_error.append(_relative(want, ours))
    assert sum(fused_error) <= 1.25 * sum(python_error)
    for mine, theirs in zip(fused.tier_layers, python.tier_layers, strict=True):
        a, b = mine.buffer, theirs.buffer
        assert (a.length, mine.seen) == (b.length, theirs.seen) == (158, 158)
        assert torch.equal(a.positions[:, : a.length], b.positions[:, : b.length])
        assert _relative(b.view()[0], a.view()[0]) < TOLERANCE and _relative(b.view()[1], a.view()[1]) < TOLERANCE
        assert a.capacity >= a.length > 154  # it grew past the planned 150 + 4


def test_a_wrong_position_is_outside_the_tolerance() -> None:
    """The tolerance tells positions apart: the same token one position later moves the logits past it."""
    lm = _lm()
    python = _prefilled(lm, "int8")
    fused = copy.deepcopy(python)
    with torch.inference_mode(), patched_attention(lm.model):
        want = forward_token(lm.model, python, 5)
        decoder, _ = fused_decoder(lm, [fused])
        assert decoder is not None
        for layer in fused.tier_layers:
            layer.seen += 1
        assert _relative(want, decoder.step([fused], [5])[0]) > TOLERANCE


def test_a_batch_of_caches_steps_as_each_alone() -> None:
    """Rows at different lengths share the GEMVs; each row's logits and cache are those of its own step, bit for
    bit (the GEMV kernels compute each row alone)."""
    lm = _lm()
    short, long = _prefilled(lm, "int8", tokens=40), _prefilled(lm, "bfloat16", tokens=150)
    alone = [copy.deepcopy(short), copy.deepcopy(long)]
    with torch.inference_mode(), patched_attention(lm.model):
        decoder, why = fused_decoder(lm, [short, long])
        assert decoder is not None, why
        for tokens in ([5, 9], [17, 3]):
            both = decoder.step([short, long], tokens)
            each = torch.cat([decoder.step([c], [t]) for c, t in zip(alone, tokens, strict=True)])
            assert both.shape == (2, 128) and torch.equal(both, each)
    assert [c.tier_layers[0].seen for c in (short, long)] == [42, 152]
    for batched, single in zip([short, long], alone, strict=True):
        assert torch.equal(batched.tier_layers[1].buffer.stored()[0], single.tier_layers[1].buffer.stored()[0])


def test_python_reads_on_from_a_fused_cache() -> None:
    lm = _lm()
    python = _prefilled(lm, "int8")
    mixed = copy.deepcopy(python)
    with torch.inference_mode(), patched_attention(lm.model):
        decoder, _ = fused_decoder(lm, [mixed])
        assert decoder is not None
        for token in (5, 17, 99):
            forward_token(lm.model, python, token)
            decoder.step([mixed], [token])
        assert _relative(forward_token(lm.model, python, 7), forward_token(lm.model, mixed, 7)) < TOLERANCE


def test_snapkv_runs_fused_once_compressed() -> None:
    lm = _lm()
    python = _prefilled(lm, "int8", policy="snapkv")
    assert python.kv_tokens() < 150
    fused = copy.deepcopy(python)
    with torch.inference_mode(), patched_attention(lm.model):
        decoder, why = fused_decoder(lm, [fused])
        assert decoder is not None, why
        assert _relative(forward_token(lm.model, python, 9), decoder.step([fused], [9])[0]) < TOLERANCE


@pytest.mark.parametrize(
    ("dtype", "policy", "kv", "mode", "reason"),
    [
        (torch.float32, "full", "auto", "auto", "activations"),
        (torch.bfloat16, "streaming", "int8", "auto", "does more than append"),
        (torch.bfloat16, "full", "float32", "auto", "KV rows in float32"),
        (torch.bfloat16, "full", "int8", "python", "--decode-step python"),
    ],
)
def test_the_python_step_runs_where_fused_does_not_apply(
    dtype: torch.dtype, policy: str, kv: str, mode: str, reason: str
) -> None:
    lm = _lm(dtype=dtype)
    cache = _prefilled(lm, kv, policy=policy)
    decoder, why = fused_decoder(lm, [cache], mode)
    assert decoder is None and reason in why


def test_generate_reports_the_step_and_rejects_an_unknown_one() -> None:
    lm = _lm()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    prompt = Prompt(context_ids=ids, question_ids=ids[:, :0], style="completion")
    lm.tokenizer = type("Tok", (), {"decode": lambda self, ids, **kw: " ".join(map(str, ids)), "eos_token_id": None})()
    lm.model.generation_config.eos_token_id = None
    config = GenerationConfig(max_new_tokens=6, store=StoreConfig(kv_dtype="int8"))
    fused = generate(lm, prompt, build("full"), config)
    python = generate(lm, prompt, build("full"), GenerationConfig(max_new_tokens=6, decode_step="python"))
    assert fused.stats.extra["decode_step"] == "fused" and fused.stats.decode_steps == 5
    assert python.stats.extra["decode_step"].startswith("python")
    with pytest.raises(TiermemError, match="unknown decode step"):
        GenerationConfig(decode_step="compiled")


def test_the_int8_head_kernel_matches_float() -> None:
    """The fused step's LM head (int16 activations, exact int32 sums) against float32 over the same int8 rows."""
    native = decode_extension()[0]
    if not hasattr(native, "head_int8"):
        pytest.skip("built without AVX-512BW: the fused step uses PyTorch's int8 kernel for the head")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (512, 576), dtype=torch.int8, generator=generator)
    scales = (torch.rand(512, generator=generator) * 0.01).bfloat16()
    x = (torch.randn(2, 576, generator=generator) * torch.logspace(-3, 1, 576)).bfloat16()  # wide-ranging magnitudes
    want = x.float() @ (weight.float() * scales.float()[:, None]).T
    got = native.head_int8(x, weight, scales)
    assert got.dtype == torch.float32 and _relative(want, got) < 1e-4
