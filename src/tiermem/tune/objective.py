"""Losses and metrics of a task: MeZO's prompt-based classification and causal-LM perplexity.

Classification follows MeZO's ``--train_as_classification``: the loss is the cross-entropy over the label words'
logits at the last prompt position (the model chooses among the label words only), and the prediction is the label
word with the largest logit. A label word that is several tokens is represented by its first token (all of MeZO's
SST-2 words are one token in the Llama and Gemma tokenizers tiermem supports).

Prompts are left-padded with explicit ``position_ids`` (the cumulative sum of the mask), so a padded row computes
exactly what it would alone and the last position is the prompt's last token for every row. Language modelling
pads on the right and masks the padding out of the labels (mean over real next-token predictions).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from tiermem.errors import TiermemError
from tiermem.tune.tasks import Example, Task

MAX_TOKENS = 128  # prompts and LM paragraphs are cut to this many tokens


@dataclass
class Batch:
    """Tokenised examples: ``input_ids``/``attention_mask``/``position_ids`` (B, T); ``labels`` (B,) class indices
    for classification, (B, T) next-token targets with -100 for padding for language modelling."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


class Objective:
    """Turns a task's examples into batches and a model's outputs into a loss or a metric."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, max_tokens: int = MAX_TOKENS):
        self.task, self.tokenizer, self.max_tokens = task, tokenizer, max_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.label_ids: list[int] = []
        for word in task.label_words:
            ids = tokenizer.encode(word, add_special_tokens=False)
            if not ids:
                raise TiermemError(f"label word '{word}' is empty after tokenization")
            self.label_ids.append(ids[0])
        if task.kind == "classify" and len(set(self.label_ids)) != len(self.label_ids):
            words = ", ".join(repr(w) for w in task.label_words)
            raise TiermemError(f"label words {words} share their first token: the logits cannot tell them apart")

    def batch(self, examples: Sequence[Example]) -> Batch:
        rows = [self.tokenizer.encode(self.task.prompt(e))[-self.max_tokens :] for e in examples]
        if any(not row for row in rows):
            raise TiermemError("an example tokenizes to nothing")
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = self.task.kind == "classify"
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if left:
            labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        return Batch(ids, mask, positions, labels)

    def loss_from_logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Scalar loss. Classification: ``logits`` (B, 1, V) at the last position; LM: (B, T, V)."""
        if self.task.kind == "classify":
            scores = logits[:, -1, self.label_ids].float()
            return F.cross_entropy(scores, batch.labels)
        shifted = logits[:, :-1].float()
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), batch.labels[:, 1:].reshape(-1))

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        keep = 1 if self.task.kind == "classify" else 0  # 0: every position
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=keep,
            use_cache=False,
        )
        return out.logits

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_from_logits(self.logits(model, batch), batch)

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 16) -> dict[str, float]:
        """Accuracy (classification) or perplexity (LM) on the test set, plus the mean test loss."""
        test = self.task.test
        correct, total_loss, total_tokens = 0, 0.0, 0
        for start in range(0, len(test), batch_size):
            batch = self.batch(test[start : start + batch_size])
            logits = self.logits(model, batch)
            if self.task.kind == "classify":
                scores = logits[:, -1, self.label_ids].float()
                correct += int((scores.argmax(-1) == batch.labels).sum())
                total_loss += float(F.cross_entropy(scores, batch.labels, reduction="sum"))
            else:
                targets = batch.labels[:, 1:]
                count = int((targets != -100).sum())
                total_loss += float(self.loss_from_logits(logits, batch)) * count
                total_tokens += count
        if self.task.kind == "classify":
            return {"accuracy": correct / len(test), "loss": total_loss / len(test)}
        mean = total_loss / max(total_tokens, 1)
        return {"perplexity": math.exp(mean), "loss": mean}


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The training examples of step ``step``: epochs of seeded shuffles, a pure function of (seed, step).

    Like the HF Trainer's random sampler MeZO uses, every example is seen once per epoch; being a function of the
    step alone, a resumed run draws exactly the batches the uninterrupted run drew.
    """
    size = min(batch_size, n)
    per_epoch = max(1, n // size)
    epoch, index = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[index * size : (index + 1) * size]
