"""Fused q/k/v and gate/up projections (tiermem.weights.fuse): same logits bit for bit, views not copies, and the
fused path steps aside for hooks and replaced modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from tests.conftest import sharpen
from tiermem.attention import patched_attention
from tiermem.cache import TierCache
from tiermem.engine import forward, prefill
from tiermem.kvstore.blocks import StoreConfig
from tiermem.memory import build
from tiermem.weights.fuse import GATE_UP, QKV, fuse_linears, fuse_projections, fused_qkv
from tiermem.weights.quant import Int4WeightOnlyLinear, quantize_weights


def _model(mode: str) -> PreTrainedModel:
    """A tiny Llama whose projections are whole 64-row blocks (q 128, k/v 64, gate/up 256), quantized to ``mode``."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    model = sharpen(LlamaForCausalLM(cfg))
    model = model.to(torch.bfloat16)
    quantize_weights(model, mode)
    return model


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's buffers and its fused modules' buffers."""
    tensors = list(model.buffers())
    for module in model.modules():
        for key in (QKV, GATE_UP):
            if key in vars(module):
                tensors += list(vars(module)[key].module.buffers())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _run(model: PreTrainedModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits (steps + 1, vocab): a chunked prefill (chunks wide enough for the widened-weight GEMM) then decode."""
    cache = TierCache(model, build("full"), store=StoreConfig(kv_dtype="int8"))
    cache.plan(ids.shape[1], ids.shape[1] + steps, 160)
    out = []
    with torch.inference_mode(), patched_attention(model):
        logits = prefill(model, cache, ids, 160)
        out.append(logits)
        for _ in range(steps):
            logits = forward(model, cache, logits.argmax().view(1, 1))
            out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_projections_give_the_same_logits(mode: str) -> None:
    plain = _model(mode)
    fused = copy.deepcopy(plain)
    before = _storage_bytes(fused)
    assert fuse_projections(fused, torch.bfloat16) == 4  # q/k/v and gate/up of both layers
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert fused_qkv(attn) is not None and GATE_UP in vars(mlp)
    # the parts are views of the fused storage: no second copy of any weight
    qkv = vars(attn)[QKV]
    assert attn.q_proj.weight.untyped_storage().data_ptr() == qkv.module.weight.untyped_storage().data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.module.weight.untyped_storage().data_ptr()
    assert _storage_bytes(fused) == before  # every part's weight and scales are views of the fused tensors
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_run(plain, ids, 8), _run(fused, ids, 8))


def test_a_hooked_or_replaced_part_takes_the_separate_path() -> None:
    model = _model("int4")
    fuse_projections(model, torch.bfloat16)
    attn = model.model.layers[0].self_attn
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    fused_logits = _run(model, ids, 2)
    seen: list[torch.Size] = []
    handle = attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert fused_qkv(attn) is None
    # the parts read views of the fused weights and scales (int4 scales are strided): same logits
    assert torch.equal(_run(model, ids, 2), fused_logits)
    assert len(seen) == 3  # the prefill and two decode steps went through q_proj itself
    handle.remove()
    assert fused_qkv(attn) is not None
    attn.k_proj = copy.deepcopy(attn.k_proj)  # e.g. an adapter wrapping it: the fused copy would be stale
    assert fused_qkv(attn) is None


def test_parts_that_cannot_stack_stay_apart() -> None:
    torch.manual_seed(0)
    odd = [Int4WeightOnlyLinear(nn.Linear(64, n, bias=False).to(torch.bfloat16), 32) for n in (64, 96)]
    weights = [p.weight for p in odd]
    assert fuse_linears(odd, torch.bfloat16) is None  # 96 rows are not whole 64-row blocks
    assert all(p.weight is w for p, w in zip(odd, weights, strict=True))
    mixed = [Int4WeightOnlyLinear(nn.Linear(64, 64, bias=False).to(torch.bfloat16), g) for g in (32, 64)]
    assert fuse_linears(mixed, torch.bfloat16) is None
    float_parts = [nn.Linear(64, 64) for _ in range(2)]
    assert fuse_linears(float_parts, torch.float32) is None
