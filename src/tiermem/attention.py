"""The one place that touches the model's attention modules.

Every attention module's ``forward`` is replaced (reversibly) by one generic forward that runs the module's own
projections and QK-norms, then hands the pre-RoPE queries, keys and values to the layer's :class:`TierLayer`, which
applies RoPE its own way, stores what its policy keeps, and attends. Why not a transformers ``Cache`` subclass plus a
registered attention function: a cache sees keys after RoPE and never sees queries, and SnapKV, InfLLM, EM-LLM and
SentenceKV all need queries, and some need keys before RoPE.

While patched, the model's attention implementation is set to ``"tiermem"``, registered with transformers without a
mask function, so transformers skips building attention masks (layers mask by position themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel

from tiermem.layer_info import LayerInfo, attention_modules, describe_layers
from tiermem.memory.layer import DenseLayer, TierLayer
from tiermem.weights.fuse import fused_qkv

ATTN_IMPLEMENTATION = "tiermem"
LayerFactory = Callable[[LayerInfo], TierLayer]


def _not_used(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("tiermem's attention runs inside the patched forward; this function is a registration stub")


AttentionInterface.register(ATTN_IMPLEMENTATION, _not_used)


def _layer_for(cache: Any, info: LayerInfo, layer_factory: LayerFactory | None) -> tuple[TierLayer, bool]:
    """The tiermem layer for this forward, and whether it was created by the policy's context manager."""
    if cache is None:  # a plain forward without cache: attend over this forward's tokens only
        return DenseLayer(info), False
    layers = cache.layers
    while len(layers) <= info.layer_idx:
        layers.append(None)
    layer = layers[info.layer_idx]
    if isinstance(layer, TierLayer):
        return layer, layer.end_context_after_prefill
    if layer_factory is None:
        raise RuntimeError("this cache holds no tiermem layers: build it with TierCache or run under a policy")
    if layer is not None and layer.get_seq_length() > 0:
        raise RuntimeError("cannot take over a cache that already holds tokens from a run without tiermem")
    layer = layer_factory(info)
    layer.end_context_after_prefill = True  # generate() prefills in one forward: compress right after it
    layers[info.layer_idx] = layer
    return layer, True


def _project(module: Any, info: LayerInfo, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The module's own projections and QK-norms: q (B, Hq, T, D), k and v (B, Hkv, T, D), before RoPE."""
    batch, t, _ = hidden_states.shape
    shape = (batch, t, -1, info.head_dim)
    fused = fused_qkv(module)  # one GEMV for the three (tiermem.weights.fuse), when the loader fused them
    if fused is not None and t == 1:  # a decode step: (B, 1, H*D) is (B, H, 1, D) by a view (one op, not two)
        q, k, v = (x.view(batch, -1, 1, info.head_dim) for x in fused.split(hidden_states))
    elif fused is not None:
        q, k, v = (x.reshape(shape).transpose(1, 2) for x in fused.split(hidden_states))
    else:
        q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    if hasattr(module, "q_norm"):  # Qwen3 and Gemma3 normalise queries and keys per head before RoPE
        q, k = module.q_norm(q), module.k_norm(k)
    return q, k, v


def _attention_forward(
    module: Any,
    info: LayerInfo,
    layer_factory: LayerFactory | None,
    hidden_states: torch.Tensor,
    position_embeddings: Any = None,
    attention_mask: Any = None,
    cache: Any = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Replacement for ``Attention.forward`` of Llama, Mistral, Qwen2/3 and Gemma3 modules.

    Batch size 1, or one :class:`tiermem.cache.TierCache` per batch row (a cache with ``rows``, as
    ``tiermem.serve.batch.BatchCache``): then the projections run once for the batch and each row attends under its
    own cache's layer (batched decoding of independent sessions).
    """
    batch, t, _ = hidden_states.shape
    owner = cache if cache is not None else past_key_values
    q, k, v = _project(module, info, hidden_states)
    if batch != 1:
        rows = getattr(owner, "rows", None)
        if rows is None or len(rows) != batch:
            raise ValueError(f"tiermem runs batch size 1, or one TierCache per batch row; got batch {batch}")
        outs = []
        for row, qb, kb, vb in zip(rows, q.split(1), k.split(1), v.split(1), strict=True):
            row_layer, _ = _layer_for(row, info, None)
            outs.append(row_layer.attend(qb, kb, vb))
            row_layer.report()
        return module.o_proj(torch.cat(outs).transpose(1, 2).reshape(batch, t, -1)), None
    layer, auto_end = _layer_for(owner, info, layer_factory)
    if layer.probe_start is not None:  # a look at the question that stores nothing (TierCache.probe)
        return module.o_proj(layer.probe(q, k, v).transpose(1, 2).reshape(1, t, -1)), None
    out = layer.attend(q, k, v)
    if auto_end and t > 1:
        layer.end_context()
    layer.report()
    return module.o_proj(out.transpose(1, 2).reshape(1, t, -1)), None


@contextmanager
def patched_attention(model: PreTrainedModel, layer_factory: LayerFactory | None = None) -> Iterator[None]:
    """Run ``model`` with tiermem's attention forward inside the block; the original forwards come back after.

    With ``layer_factory`` (a policy's ``make_layer``), a cache that ``generate`` creates is taken over layer by
    layer; without it, the cache passed to the model must be a :class:`tiermem.cache.TierCache`.
    """
    modules = attention_modules(model)
    if any("forward" in vars(m) for m in modules):
        raise RuntimeError("the model's attention is already patched (nested tiermem policies are not supported)")
    infos = describe_layers(model)
    previous = model.config._attn_implementation
    try:
        for module, info in zip(modules, infos, strict=True):
            module.forward = partial(_attention_forward, module, info, layer_factory)
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)
        model.config._attn_implementation = previous
