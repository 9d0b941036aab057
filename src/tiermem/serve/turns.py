"""A request as the model worker sees it: the turn, the job that carries its events, its text in pieces, and its
state between decode steps."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tiermem.engine import GenerationConfig
from tiermem.serve.sessions import Session


@dataclass
class Turn:
    """One request, model-agnostic: ``messages`` (chat) or ``prompt`` (text or token ids)."""

    owner: str
    max_tokens: int | None  # None: the server's default, shortened to the positions the model has left
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None


@dataclass
class Job:
    turn: Turn
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    ids: list[int] | None = None  # the prompt's token ids, once the worker has tokenized it

    def emit(self, kind: str, data: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


class TextDelta:
    """Text of the generated ids, released in pieces: an incomplete UTF-8 character and anything that could be the
    start of a stop string are held back until the next token settles them."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.emitted = 0

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, text: str) -> str:
        end = len(text) - self.hold
        if text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        piece = text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece

    def rest(self, text: str) -> str:
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece


@dataclass
class Running:
    """A turn between decode steps. While ``reading``, ``pending`` holds the prompt tokens not fed yet; then
    ``token`` is sampled and waits to be fed; the session holds everything before."""

    job: Job
    session: Session
    start: dict[str, Any]
    config: GenerationConfig
    generator: torch.Generator
    delta: TextDelta
    ids: list[int] = field(default_factory=list)
    token: int | None = None
    finish: str = "length"
    text: str = ""
    reading: bool = True
    pending: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)  # the whole prompt: a fresh session probes its tail
    fresh: bool = False
