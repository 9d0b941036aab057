"""What a KV policy needs to know about one attention layer, read once from the HF model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from tiermem.kvstore.quant import kv_format
from tiermem.rope import Rope


@dataclass(frozen=True)
class LayerInfo:
    """Shape and attention rules of one decoder layer.

    ``sliding_window`` is set on local-attention layers (Gemma3, Mistral): a query at position p sees keys at
    positions in (p - sliding_window, p]. ``softcap`` is Gemma2-style logit soft-capping (None for most models).
    """

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int | None
    softcap: float | None
    rope: Rope
    max_positions: int
    dtype: torch.dtype
    kv_dtype: str = "auto"  # how KV rows are stored (tiermem.kvstore.quant.KV_DTYPES); auto: as ``dtype``

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self) -> int:
        """Bytes of K plus V for one token in this layer, as stored (int8 rows carry their scales)."""
        return 2 * self.num_kv_heads * kv_format(self.kv_dtype, self.dtype).row_bytes(self.head_dim)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: not a supported decoder-only architecture")
    return layers


def attention_modules(model: PreTrainedModel) -> list[Any]:
    """The ``self_attn`` module of every decoder layer (typed Any: their attributes are the model family's)."""
    modules: list[Any] = [layer.self_attn for layer in decoder_layers(model)]
    for module in modules:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(module, name):
                raise ValueError(f"{type(module).__name__} has no {name}: not a supported attention module")
    return modules


def describe_layers(model: PreTrainedModel, kv_dtype: str = "auto") -> list[LayerInfo]:
    """One :class:`LayerInfo` per decoder layer, sharing one :class:`Rope` per RoPE flavour; KV rows stored as
    ``kv_dtype``."""
    config = model.config
    rotary: Any = model.model.rotary_emb
    ropes: dict[str | None, Rope] = {}
    infos = []
    for idx, module in enumerate(attention_modules(model)):
        head_dim = int(module.head_dim)
        layer_type = getattr(module, "layer_type", None)
        if layer_type not in ropes:
            ropes[layer_type] = Rope(rotary, layer_type, model.dtype)
        # Mistral keeps its window in the config rather than on the module.
        window = module.sliding_window if hasattr(module, "sliding_window") else getattr(config, "sliding_window", None)
        infos.append(
            LayerInfo(
                layer_idx=idx,
                num_heads=module.q_proj.out_features // head_dim,
                num_kv_heads=module.k_proj.out_features // head_dim,
                head_dim=head_dim,
                scaling=float(module.scaling),
                sliding_window=int(window) if window else None,
                softcap=getattr(module, "attn_logit_softcapping", None),
                rope=ropes[layer_type],
                max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
                dtype=model.dtype,
                kv_dtype=kv_dtype,
            )
        )
    return infos
