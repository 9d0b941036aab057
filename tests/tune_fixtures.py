"""A tiny random Llama whose word-level tokenizer covers the polarity task, so label words are single tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tiermem.tune.tasks import polarity_sentences
from tiermem.tune.zo import ZOHyper


def make_tiny_tune_model(folder: Path, layers: int = 2, tied: bool = False) -> Path:
    """Save a 2-layer Llama (hidden 64) with a word-level tokenizer of every word in the polarity data."""
    words = sorted({w for e in polarity_sentences() for w in e.text.split()} | {"It", "was", "great", "terrible"})
    vocab = {"[UNK]": 0, "<|end|>": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|end|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def torch_reference(
    method: str, hyper: ZOHyper, param: torch.Tensor
) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    """A copy of ``param`` and the torch optimizer ZO-Bench runs for ``method`` on ĝ (SGD, SGD with momentum, Adam)."""
    reference = torch.nn.Parameter(param.clone())
    if method == "zo-adam":
        return reference, torch.optim.Adam([reference], lr=hyper.lr, weight_decay=hyper.weight_decay)
    momentum = hyper.momentum if method == "zo-sgd-mmt" else 0.0
    return reference, torch.optim.SGD([reference], lr=hyper.lr, momentum=momentum, weight_decay=hyper.weight_decay)
