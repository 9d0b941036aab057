"""The model runner: one thread owns the model and the session store; requests reach it through a bounded queue.

The model is not thread-safe (tiermem's attention forward is patched onto its modules), so every forward runs on
this thread, one turn at a time. Async endpoints submit a :class:`Job` and await its events (``start``, ``text``,
``done`` or ``error``), which the thread hands to the event loop with ``call_soon_threadsafe``. A job whose client
went away is cancelled: a queued one is skipped, a running one stops at its next token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tiermem.attention import patched_attention
from tiermem.engine import GenerationConfig, forward, prefill, sample, stop_token_ids, token_pieces
from tiermem.errors import TiermemError
from tiermem.memory.base import Policy
from tiermem.models import LoadedModel
from tiermem.serve.metrics import Metrics
from tiermem.serve.schemas import ApiError
from tiermem.serve.sessions import Session, SessionStore, SessionUnavailable

log = logging.getLogger("tiermem.serve")


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

    def emit(self, kind: str, data: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


class Overloaded(Exception):
    """The queue is full."""


class ShuttingDown(Exception):
    """The worker takes no new turns."""


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


class ModelWorker:
    def __init__(
        self,
        lm: LoadedModel,
        policy: Policy,
        store: SessionStore,
        metrics: Metrics,
        max_queue: int = 16,
        chunk_size: int = 512,
        default_max_tokens: int = 256,
    ):
        self.default_max_tokens = default_max_tokens
        self.lm = lm
        self.policy = policy
        self.store = store
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.stops = stop_token_ids(lm)
        self.vocab = int(lm.model.get_input_embeddings().weight.shape[0])
        self.busy = False
        self.closing = False
        self._thread = threading.Thread(target=self._loop, name="tiermem-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new turns, cancel queued ones, finish the running one, write what is not on disk yet."""
        self.closing = True
        with self.jobs.mutex:
            for job in self.jobs.queue:
                if job is not None:
                    job.cancelled.set()
        self.jobs.put(None)
        self._thread.join(timeout=60)
        self.store.close()

    def submit(self, job: Job) -> None:
        if self.closing:
            raise ShuttingDown
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Overloaded from None

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + int(self.busy)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():  # its client left, or the server is stopping
                job.emit("error", ApiError(503, "the request was cancelled", kind="server_error"))
                continue
            self.busy = True
            try:
                self._run(job)
            except ApiError as exc:
                job.emit("error", exc)
            except TiermemError as exc:
                job.emit("error", ApiError(400, str(exc)))
            except Exception as exc:  # never let one request take the worker down
                log.error("turn failed: %s", traceback.format_exc())
                job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))
            finally:
                self.busy = False

    # -- one turn ------------------------------------------------------------------------------------------------
    def tokenize(self, turn: Turn) -> list[int]:
        tokenizer = self.lm.tokenizer
        if turn.messages is not None:
            if not self.lm.has_chat_template:
                raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
            try:
                text = tokenizer.apply_chat_template(turn.messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template may refuse an order of roles
                raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
            return list(tokenizer(str(text), add_special_tokens=False).input_ids)
        if isinstance(turn.prompt, list):
            if any(not 0 <= i < self.vocab for i in turn.prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {self.vocab})", param="prompt")
            return list(turn.prompt)
        return list(tokenizer(str(turn.prompt)).input_ids)

    def _run(self, job: Job) -> None:
        turn = job.turn
        ids = self.tokenize(turn)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if turn.max_tokens is None:
            limit = self.default_max_tokens
            if self.lm.max_positions and not self.policy.fits_any_length:
                limit = max(1, min(limit, self.lm.max_positions - len(ids)))
            turn = job.turn = dataclasses.replace(turn, max_tokens=limit)
        assert turn.max_tokens is not None
        total = len(ids) + turn.max_tokens
        try:
            self.policy.check(len(ids), total, self.lm.max_positions)
        except TiermemError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        try:
            lease = self.store.acquire(turn.owner, np.asarray(ids, dtype=np.int64))
        except SessionUnavailable as exc:  # this session only: the server keeps serving the others
            raise ApiError(409, str(exc), code="session_unavailable") from None
        session = lease.session
        ok = False
        try:
            job.emit("start", {"prompt_tokens": len(ids), "cached_tokens": lease.reused, "session": session.id})
            completion, finish, text = self._generate(job, session, lease.fresh, ids[lease.reused :])
            ok = True
        finally:
            self.store.release(session, ok)  # durable: on disk before the response ends
        self.metrics.turn(len(ids), lease.reused, len(completion))
        job.emit(
            "done", {"finish_reason": finish, "completion_tokens": len(completion), "text": text, "ids": completion}
        )

    def _generate(self, job: Job, session: Session, fresh: bool, new: list[int]) -> tuple[list[int], str, str]:
        """Prefill ``new`` on the leased session, then decode. Keeps ``session.tokens`` and ``session.logits``
        equal to what the cache holds after every forward, so a turn stopped anywhere leaves a usable session.
        Returns the generated ids, the finish reason (``stop``, ``length`` or ``cancelled``) and the text."""
        turn, model, cache = job.turn, self.lm.model, session.cache
        assert cache is not None and turn.max_tokens is not None
        config = GenerationConfig(max_new_tokens=turn.max_tokens, temperature=turn.temperature, top_p=turn.top_p)
        generator = torch.Generator().manual_seed(turn.seed)
        delta = TextDelta(self.lm.tokenizer, turn.stop)
        ids: list[int] = []
        finish, text = "length", ""
        with torch.inference_mode(), patched_attention(model):
            logits = session.logits
            if fresh:
                held = len(session.tokens) + len(new)
                cache.plan(held, held + turn.max_tokens)
            if new:
                logits = prefill(model, cache, torch.tensor([new]), self.chunk_size, logits)
                session.tokens = np.concatenate([session.tokens, np.asarray(new, dtype=np.int64)])
                session.logits = logits
            if fresh:
                cache.end_context()  # the first prompt is the context a compressing policy compresses
            session.prompt_len = len(session.tokens)
            assert logits is not None
            while True:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                token = sample(logits, config, generator)
                if not ids:
                    self.metrics.first_token(time.perf_counter() - job.submitted)
                if token in self.stops and not turn.ignore_eos:
                    finish = "stop"
                    break
                ids.append(token)
                text = delta.text(ids)
                hit = [text.index(s) for s in turn.stop if s in text]
                if hit:
                    text, finish = text[: min(hit)], "stop"
                    break
                if piece := delta.push(text):
                    job.emit("text", piece)
                if len(ids) >= turn.max_tokens:
                    break
                if cache.policy.needs_surprise:  # the generated token's own surprise
                    cache.observe_surprise((torch.logsumexp(logits, dim=-1) - logits[token]).reshape(1))
                if cache.policy.needs_token_text:
                    cache.observe_tokens(cache.get_seq_length(), token_pieces(cache, [token]))
                logits = forward(model, cache, torch.tensor([[token]]))
                session.tokens = np.append(session.tokens, token)
                session.logits = logits
        if piece := delta.rest(text):
            job.emit("text", piece)
        return ids, finish, text
