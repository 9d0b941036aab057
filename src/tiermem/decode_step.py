"""The fused decode step: one compiled call runs every decoder layer of a Llama-family model for one token.

A Python decode step of SmolLM2 dispatches ~2,900 small PyTorch operations, and that dispatch, not the bytes of the
weights, is most of the step on a 2-core CPU (BENCHMARKS.md). :class:`FusedDecoder` hands the whole step to
``csrc/decode_step.cpp`` (:mod:`tiermem.native`): the quantized GEMVs stay on PyTorch's kernels, the rest is plain
loops. It is the llama.cpp / gpt-fast idea (a graph or a compiled step, not a fork of the model) for the case that
matters most: greedy or sampled decoding with resident weights.

It runs only where it computes what the Python step computes: a Llama-family bf16 model (SiLU MLP, no biases, no
sliding window, no soft-capping), resident weights quantized and fused by tiermem's loader (int4 or int8 GEMVs, the
int8 LM head), no hooks on the model, and every cache layer a dense buffer whose decode step is "append one token,
attend all of it" (:meth:`tiermem.memory.layer.TierLayer.decode_buffer`: the full cache, and SnapKV and the scorer
policies once they have compressed), in int8 or bf16. Anything else runs the Python step, and the run's stats say
which ran and why (``decode_step``). A batch of caches (the server's running turns) shares each weight GEMV.
Results match the Python step within bf16 rounding, not bit for bit: the residual stream stays in float32 and RoPE
tables are float32 here. Against float32 over the same quantized weights the fused step is no further off than the
Python step (tests/test_decode_step.py).
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from tiermem.cache import TierCache
from tiermem.kvstore.dense import KVBuffer
from tiermem.layer_info import decoder_layers, describe_layers
from tiermem.models import LoadedModel
from tiermem.native import decode_extension
from tiermem.rope import DYNAMIC_TYPES, Rope
from tiermem.weights.fuse import GATE_UP, fused_qkv
from tiermem.weights.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear

FAMILIES = ("llama", "mistral")  # model types whose decoder layer is the one csrc/decode_step.cpp writes out
DECODE_STEPS = ("auto", "python")  # --decode-step: the fused step where it applies, or always the Python one


def _linear(module: Any) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(weight, scales, group) as the compiled step takes a quantized Linear (group 0: int8), or None."""
    if type(module) is Int4WeightOnlyLinear and module.padded_in == module.in_features and module.bias is None:
        return module.weight, module.scales_and_zeros.contiguous(), module.group_size
    if type(module) is Int8WeightOnlyLinear and module.bias is None:
        return module.weight, module.scales, 0
    return None


def _hooked(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _model_reason(lm: LoadedModel) -> str:
    """Why the model cannot run the fused step ("" when it can)."""
    model, config = lm.model, lm.model.config
    if lm.placement is not None:
        return "weights are not resident"
    if config.model_type not in FAMILIES or getattr(config, "sliding_window", None):
        return f"model type {config.model_type} (fused: {', '.join(FAMILIES)} without sliding window)"
    if model.dtype != torch.bfloat16:
        return f"activations in {model.dtype} (fused: bfloat16)"
    if config.hidden_act != "silu" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "activation or biases differ from Llama's"
    if type(model.lm_head) is not Int8WeightOnlyLinear or model.model.embed_tokens.weight.dtype != torch.bfloat16:
        return "LM head not int8 or embeddings not bf16"
    if _hooked(model):
        return "the model has hooks"
    for layer in decoder_layers(model):
        parts = [_linear(layer.self_attn.o_proj), _linear(layer.mlp.down_proj)]
        if fused_qkv(layer.self_attn) is None or layer.mlp.__dict__.get(GATE_UP) is None or None in parts:
            return "weights not quantized and fused by tiermem's loader"
    if getattr(model.model.rotary_emb, "rope_type", "default") in DYNAMIC_TYPES:
        return "RoPE frequencies depend on the length"
    return ""


def cache_reason(cache: TierCache) -> str:
    """Why this cache's layers cannot run the fused step ("" when they can)."""
    buffers = [layer.decode_buffer() for layer in cache.tier_layers]
    if any(b is None or type(b) is not KVBuffer for b in buffers):
        return f"policy {cache.policy.name} does more than append and attend at a decode step"
    for buffer in buffers:
        assert buffer is not None
        if buffer.scores.shape[0] or buffer.format.name not in ("int8", "bfloat16"):
            return f"KV rows in {buffer.format.name} (fused: int8, bfloat16)"
    if len({layer.seen for layer in cache.tier_layers}) != 1:
        return "layers at different positions"
    return ""


class FusedDecoder:
    """The compiled decode step over one model's weights; :meth:`step` feeds one token to each of a batch of caches
    (a batch of one in ``generate``; the server's running turns). Get it from :func:`fused_decoder`."""

    def __init__(self, native: Any, lm: LoadedModel):
        model, info = lm.model, describe_layers(lm.model)[0]
        self.rope: Rope = info.rope
        weights: list[torch.Tensor] = []
        groups: list[int] = []
        for layer in decoder_layers(model):
            qkv, gate_up = fused_qkv(layer.self_attn), layer.mlp.__dict__[GATE_UP]
            assert qkv is not None
            linears = [_linear(qkv.module), _linear(layer.self_attn.o_proj)]
            linears += [_linear(gate_up.module), _linear(layer.mlp.down_proj)]
            (qw, qs, qg), (ow, os_, og), (gw, gs, gg), (dw, ds, dg) = linears  # type: ignore[misc]
            norms = [layer.input_layernorm.weight.float(), layer.post_attention_layernorm.weight.float()]
            weights += [norms[0], qw, qs, ow, os_, norms[1], gw, gs, dw, ds]
            groups += [qg, og, gg, dg]
        config = model.config
        self.native = native.Decoder(
            weights,
            groups,
            model.model.embed_tokens.weight,
            model.model.norm.weight.float(),
            model.lm_head.weight,
            model.lm_head.scales,
            info.num_heads,
            info.num_kv_heads,
            info.head_dim,
            config.intermediate_size,
            float(config.rms_norm_eps),
            info.scaling,
        )

    def step(self, caches: list[TierCache], tokens: list[int]) -> torch.Tensor:
        """Append ``tokens[i]`` to every layer of ``caches[i]`` (each passed by :func:`cache_reason`) and return the
        next-token logits (B, vocab) float32."""
        blocks: list[torch.Tensor] = []
        slots: list[int] = []
        buffers: list[KVBuffer] = []
        positions = [cache.tier_layers[0].seen for cache in caches]
        for cache in caches:
            for layer in cache.tier_layers:
                buffer = layer.decode_buffer()
                assert buffer is not None
                if buffer.length >= buffer.capacity:  # grow as KVBuffer.append would
                    grown = max(int(buffer.capacity * 1.25), buffer.capacity + buffer.min_growth)
                    buffer.reserve(max(buffer.length + 1, grown))
                    layer.report()
                blocks += [buffer.keys, buffer.values, buffer.positions]
                slots.append(buffer.length)
                buffers.append(buffer)
        cos, sin = self.rope.cos_sin(torch.tensor(positions), torch.float32)  # (B, head_dim), float64 angles
        logits = self.native.step(tokens, positions, blocks, slots, cos, sin)
        for buffer in buffers:
            buffer.length += 1
        for cache in caches:
            for layer in cache.tier_layers:
                layer.seen += 1
        return logits


_DECODERS: WeakKeyDictionary[nn.Module, FusedDecoder] = WeakKeyDictionary()  # one per model: its weights' list


def fused_decoder(lm: LoadedModel, caches: list[TierCache], mode: str = "auto") -> tuple[FusedDecoder | None, str]:
    """The fused step for this model and these caches, or None and the reason the Python step runs."""
    if mode == "python":
        return None, "--decode-step python"
    reason = _model_reason(lm) or next((r for r in map(cache_reason, caches) if r), "")
    if reason:
        return None, reason
    decoder = _DECODERS.get(lm.model)
    if decoder is None:
        native, reason = decode_extension()
        if native is None:
            return None, reason
        decoder = _DECODERS[lm.model] = FusedDecoder(native, lm)
    return decoder, ""
