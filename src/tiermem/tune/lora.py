"""LoRA adapters through ``peft``, with MeZO's configuration, for both ZO (``zo-lora``) and backprop (``lora``).

MeZO (``large_models/lora.py``) adds LoRA with rank r = 8 and α = 16 to the attention's query and value projections
(OPT's ``q_proj``/``v_proj``; the Llama, Qwen, Mistral and Gemma layers tiermem supports use the same names), no
dropout, B initialised to zero so the adapted model starts as the base model. Departure: MeZO wraps the linear
layers with its own LoRA module; we use ``peft``'s, which computes the same ``W x + (α/r)·B A x`` (Hu et al. 2021).

The tuned model is saved two ways: the adapter alone (``adapter/``, ``peft``'s format, reloadable with
:func:`load_adapter`) and merged into the base weights (``model/``), which ``tiermem generate --model`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from tiermem.errors import TiermemError

LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "v_proj")


def add_lora(model: PreTrainedModel, rank: int = LORA_RANK, alpha: int = LORA_ALPHA) -> torch.nn.Module:
    """Wrap ``model`` with fresh LoRA adapters; only the adapters' A and B have ``requires_grad``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TiermemError("LoRA methods need the peft package: pip install peft") from None
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not set(LORA_TARGETS) <= names:
        raise TiermemError(f"LoRA targets {', '.join(LORA_TARGETS)} not found in the model")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
    return get_peft_model(model, config)


def load_adapter(model: PreTrainedModel, folder: Path) -> torch.nn.Module:
    """``model`` with the adapter saved in ``folder`` (by :func:`save_lora`)."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise TiermemError(f"{folder} holds no LoRA adapter (adapter_config.json is missing)")
    return PeftModel.from_pretrained(model, str(folder))


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors (A and B of every adapter), by parameter name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_lora(model: Any, out: Path) -> PreTrainedModel:
    """Save the adapter to ``out/adapter`` and return the base model with the adapter merged in (for ``model/``)."""
    model.save_pretrained(str(out / "adapter"))
    merged: PreTrainedModel = model.merge_and_unload()
    return merged
