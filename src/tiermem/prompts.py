"""Turn a context and a question into token ids, split where the context ends.

Policies compress the context before they see the question (question-agnostic, as kvpress does), so the prompt is
kept as two parts: everything up to the end of the context, and the question with the assistant header after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.errors import TiermemError
from tiermem.models import LoadedModel

STYLES = ("auto", "chat", "completion")


@dataclass
class Prompt:
    """Token ids (1, T) of the context part and of the question part of one prompt."""

    context_ids: torch.Tensor
    question_ids: torch.Tensor
    style: str

    @property
    def num_tokens(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]


def resolve_style(lm: LoadedModel, style: str) -> str:
    if style not in STYLES:
        raise TiermemError(f"unknown prompt style '{style}': use one of {', '.join(STYLES)}")
    if style == "auto":
        return "chat" if lm.has_chat_template else "completion"
    if style == "chat" and not lm.has_chat_template:
        raise TiermemError(f"model '{lm.name}' has no chat template; use the completion prompt style")
    return style


def _split_texts(lm: LoadedModel, context: str, question: str, style: str, answer_prefix: str) -> tuple[str, str, bool]:
    """The context part and the question part as text, and whether the tokenizer should add its BOS token."""
    if style == "completion":
        # A base model answers best as a completion (measured on Gemma3-270M: it echoes a chat wrapper).
        asked = f"\n\nQuestion: {question}\nAnswer:" if question else ""
        return context, asked + (" " + answer_prefix if answer_prefix else ""), True
    user = f"{context}\n\n{question}" if question else context
    rendered = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    cut = rendered.index(context) + len(context)
    return rendered[:cut], rendered[cut:] + answer_prefix, False  # the template writes its own special tokens


def build_prompt(
    lm: LoadedModel, context: str, question: str = "", style: str = "auto", answer_prefix: str = ""
) -> Prompt:
    """Token ids for ``context`` then ``question``, with the model's chat template or as a plain completion.

    ``answer_prefix`` starts the model's answer (RULER does this: "The special magic number for X ... is").
    """
    style = resolve_style(lm, style)
    context_text, question_text, add_bos = _split_texts(lm, context, question, style, answer_prefix)
    tokenizer = lm.tokenizer
    context_ids = tokenizer(context_text, add_special_tokens=add_bos, return_tensors="pt").input_ids
    question_ids = tokenizer(question_text, add_special_tokens=False, return_tensors="pt").input_ids
    return Prompt(context_ids.long(), question_ids.long().reshape(1, -1), style)
