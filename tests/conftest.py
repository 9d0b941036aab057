"""Tiny random-weight models for fast tests, and a tiny model folder (with a real tokenizer) for CLI tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=512)


def _llama() -> PreTrainedModel:
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **COMMON)
    return LlamaForCausalLM(cfg)


def _qwen3() -> PreTrainedModel:  # QK-norm
    cfg = Qwen3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **COMMON)
    return Qwen3ForCausalLM(cfg)


def _mistral() -> PreTrainedModel:  # sliding window on every layer
    cfg = MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, sliding_window=16, **COMMON)
    return MistralForCausalLM(cfg)


def _gemma3() -> PreTrainedModel:  # QK-norm, local layers interleaved with a global one, two RoPE bases
    layer_types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg = Gemma3TextConfig(
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=layer_types,
        query_pre_attn_scalar=16,
        **COMMON,
    )
    return Gemma3ForCausalLM(cfg)


ARCHITECTURES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": _llama,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma3": _gemma3,
}


def sharpen(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` in eval mode with its matrices redrawn at std 0.2. Random init with std 0.02 gives near-uniform
    attention; larger weights make attention peaked, so a wrong position or a dropped key changes the logits
    visibly."""
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model


def tiny(name: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return sharpen(ARCHITECTURES[name]())


@pytest.fixture(scope="session")
def llama() -> PreTrainedModel:
    return tiny("llama")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of prose. "
    "Numbers like 12345 and 67890 appear. What is the pass key? The pass key is 4321. "
) * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama with a trained byte-level BPE tokenizer and a chat template: loads in well under a second."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|end|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
