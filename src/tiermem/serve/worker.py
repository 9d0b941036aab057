"""The model runner: one thread owns the model and the session store; requests reach it through a bounded queue.

The model is not thread-safe (tiermem's attention forward is patched onto its modules), so every forward runs on
this thread. Async endpoints submit a :class:`~tiermem.serve.turns.Job` and await its events (``start``, ``text``,
``done`` or ``error``), which the thread hands to the event loop with ``call_soon_threadsafe``.

Continuous batching: up to ``max_batch`` turns run at once. A new turn is admitted between decode steps and its
prompt is read one chunk (``chunk_size`` tokens) at a time, oldest turn first, while every turn that is answering
gets its next token from one batched forward per step (:func:`tiermem.serve.batch.decode_step`): vLLM's chunked
prefill, so running answers keep streaming while a long prompt is read (reading it whole first stalled them,
BENCHMARKS.md). While turns are answering, a chunk is read every ``decode_per_chunk`` steps (on CPU a 512-token chunk
costs many decode steps; with new turns arriving all the time, a chunk at every step would set the time per output
token); with none answering, at every step. Chunks keep their boundaries, so an answer does not depend on the load.
Under ``--kv-memory`` a turn is admitted only while its KV (its prompt and
answer under its policy) fits beside the running turns' KV, so running sessions never hold more than the limit
together; the next turn waits, in order, until one ends (a turn alone always runs, however large).

A turn whose client went away is cancelled: a queued one is skipped, a running one leaves the batch at the next
step, its session consistent with the tokens it was fed.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback

import numpy as np
import torch

from tiermem.attention import patched_attention
from tiermem.cache import hot_bytes
from tiermem.decode_step import fused_decoder
from tiermem.engine import GenerationConfig, prefill, probe_question, sample, stop_token_ids, token_pieces
from tiermem.errors import TiermemError
from tiermem.memory.base import Policy
from tiermem.models import LoadedModel
from tiermem.serve.batch import decode_step
from tiermem.serve.metrics import Metrics
from tiermem.serve.policies import close_turn, reopen
from tiermem.serve.schemas import ApiError
from tiermem.serve.sessions import SessionStore, SessionUnavailable
from tiermem.serve.turns import Job, Running, TextDelta, Turn

log = logging.getLogger("tiermem.serve")


class Overloaded(Exception):
    """The queue is full."""


class ShuttingDown(Exception):
    """The worker takes no new turns."""


def _as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TiermemError):
        return ApiError(400, str(exc))
    log.error("turn failed: %s", traceback.format_exc())
    return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error")


class ModelWorker:
    def __init__(
        self,
        lm: LoadedModel,
        store: SessionStore,
        metrics: Metrics,
        max_queue: int = 16,
        chunk_size: int = 512,
        default_max_tokens: int = 256,
        max_batch: int = 8,
        session_memory: bool = True,
        decode_per_chunk: int = 4,
        decode_step: str = "auto",
    ):
        self.lm = lm
        self.policy = store.policies.policy  # the server's (``auto``: each session's is chosen at its first turn)
        self.store = store
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.default_max_tokens = default_max_tokens
        self.max_batch = max_batch
        self.session_memory = session_memory  # False: every turn prefills its whole prompt, and is then forgotten
        self.decode_per_chunk = decode_per_chunk
        self._since_chunk = 0  # decode steps since a prompt chunk was last read
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.stops = stop_token_ids(lm)
        self.vocab = int(lm.model.get_input_embeddings().weight.shape[0])
        self.fused, why = fused_decoder(lm, [], decode_step)  # the model's part of the check, once (may build it)
        log.info("decode step: %s", "fused" if self.fused is not None else f"python ({why})")
        self.running: list[Running] = []
        self.waiting: Job | None = None  # the next turn, held back until its KV fits under --kv-memory
        self.closing = False
        self._thread = threading.Thread(target=self._loop, name="tiermem-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new turns, cancel queued ones, finish the running ones, write what is not on disk yet."""
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
        """Turns queued or running."""
        return self.jobs.qsize() + len(self.running) + (self.waiting is not None)

    # -- the loop ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        stopping = False
        with torch.inference_mode(), patched_attention(self.lm.model):
            while not (stopping and not self.running):
                while not stopping and len(self.running) < self.max_batch:
                    if self.waiting is not None:
                        if not self._fits(self.waiting):
                            break  # a running turn must end first
                        job, self.waiting = self.waiting, None
                    else:
                        try:
                            job = self.jobs.get(block=not self.running)
                        except queue.Empty:
                            break
                    if job is None:
                        stopping = True
                    elif job.cancelled.is_set():  # its client left, or the server is stopping
                        job.emit("error", ApiError(503, "the request was cancelled", kind="server_error"))
                    elif not self._fits(job):
                        self.waiting = job
                        break
                    else:
                        self._admit(job)
                if self.running:
                    self._step()
            if self.waiting is not None:  # stopping: the held turn never ran
                self.waiting.emit("error", ApiError(503, "the server is shutting down", kind="server_error"))

    def _fits(self, job: Job) -> bool:
        """Under ``--kv-memory``: whether this turn's KV fits beside what the running turns hold now (their growth
        while decoding, at most ``max_tokens`` each, is not counted). No limit, or nothing running: yes."""
        limit = self.store.kv_memory
        if limit is None or not self.running or job.cancelled.is_set():
            return True
        try:
            if job.ids is None:
                job.ids = self.tokenize(job.turn)
            n = len(job.ids)
            total = n + (job.turn.max_tokens or self.default_max_tokens)
            need = hot_bytes(self._fresh_policy(job.turn, n), self.store.policies.infos, n, total, self.chunk_size)
        except Exception:  # a bad request: admit it, and _begin answers it with its error
            return True
        return sum(t.session.ram_bytes() for t in self.running) + need <= limit

    def _admit(self, job: Job) -> None:
        try:
            running = self._begin(job)
        except Exception as exc:  # never let one request take the worker down
            job.emit("error", _as_api_error(exc))
            return
        self.running.append(running)

    def _step(self) -> None:
        """A chunk of the oldest prompt being read (every ``decode_per_chunk`` steps while turns are answering), then
        one batched decode step for the turns answering."""
        reader = next((t for t in self.running if t.reading), None)
        answering = any(not t.reading and t.token is not None for t in self.running)
        if reader is not None and answering and self._since_chunk < self.decode_per_chunk - 1:
            self._since_chunk += 1
            reader = None
        if reader is not None:
            self._since_chunk = 0
            try:
                self._read(reader)
            except Exception as exc:  # _read gave the session back
                reader.job.emit("error", _as_api_error(exc))
                reader.reading, reader.token = False, None
        batch = [t for t in self.running if not t.reading and t.token is not None]
        if batch:
            try:
                self._feed(batch)
            except Exception as exc:
                error = _as_api_error(exc)
                for turn in batch:
                    self.store.release(turn.session, ok=False)
                    turn.job.emit("error", error)
                    turn.token = None
        self.running = [t for t in self.running if t.reading or t.token is not None]

    def _run(self, job: Job) -> None:
        """One turn from start to end on the calling thread (tests; the server uses the loop)."""
        with torch.inference_mode(), patched_attention(self.lm.model):
            running = self._begin(job)
            while running.reading:
                self._read(running)
            while running.token is not None:
                self._feed([running])

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

    def _limit(self, turn: Turn, prompt_tokens: int, policy: Policy) -> Turn:
        """``turn`` with its token limit resolved and checked against ``policy`` and the model's positions."""
        limit = turn.max_tokens
        if limit is None:
            limit = self.default_max_tokens
            if self.lm.max_positions and not policy.fits_any_length:
                limit = max(1, min(limit, self.lm.max_positions - prompt_tokens))
        try:
            policy.check(prompt_tokens, prompt_tokens + limit, self.lm.max_positions)
        except TiermemError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        return dataclasses.replace(turn, max_tokens=limit)

    def _policy(self, turn: Turn, ids: np.ndarray) -> tuple[Turn, Policy, bool]:
        """The turn with its limit checked, the policy a new session would run under, and whether a stored
        session may be continued. Under auto, a conversation its session's policy cannot take any further (full
        attention past the model's positions) goes to a new session, for which auto chooses again."""
        n = len(ids)
        session, shared = self.store.match(turn.owner, ids) if self.session_memory else (None, 0)
        reuse = session is not None and shared > 0
        if reuse:
            assert session is not None
            try:
                continued = self._limit(turn, n, session.policy)
            except ApiError:
                if not self.store.policies.auto:
                    raise
                reuse = False
        fresh = self._fresh_policy(turn, n)
        checked = self._limit(turn, n, fresh)
        return (continued if reuse else checked), fresh, reuse

    def _fresh_policy(self, turn: Turn, prompt_tokens: int) -> Policy:
        """The policy a new session for this turn's ``prompt_tokens`` would run under (auto chooses per length)."""
        total = prompt_tokens + (turn.max_tokens or self.default_max_tokens)
        return self.store.policies.choose(prompt_tokens, total)[0]

    def _begin(self, job: Job) -> Running:
        """Tokenize, find or make the session and get it ready to read the prompt tokens it lacks."""
        ids = job.ids if job.ids is not None else self.tokenize(job.turn)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        array = np.asarray(ids, dtype=np.int64)
        turn, fresh_policy, reuse = self._policy(job.turn, array)
        job.turn = turn
        try:
            lease = self.store.acquire(turn.owner, array, fresh_policy, reuse)
        except SessionUnavailable as exc:  # this session only: the server keeps serving the others
            raise ApiError(409, str(exc), code="session_unavailable") from None
        session, new = lease.session, ids[lease.reused :]
        if lease.fresh and self.store.policies.auto:
            log.info("session %s (%d-token prompt) runs %r", session.id, len(ids), session.policy)
        start = {"prompt_tokens": len(ids), "cached_tokens": lease.reused, "session": session.id}
        config = GenerationConfig(max_new_tokens=turn.max_tokens or 1, temperature=turn.temperature, top_p=turn.top_p)
        generator = torch.Generator().manual_seed(turn.seed)
        running = Running(job, session, start, config, generator, TextDelta(self.lm.tokenizer, turn.stop))
        running.pending, running.prompt, running.fresh = new, ids, lease.fresh
        try:
            job.emit("start", start)
            cache = session.cache
            assert cache is not None
            if lease.fresh:
                cache.plan(len(ids), len(ids) + config.max_new_tokens, self.chunk_size)
            elif new:
                reopen(cache, len(new), config.max_new_tokens, self.chunk_size)  # compress every turn, not once
                if cache.policy.probes_question:  # the new turn picks the blocks it reads, as a question does
                    cache.probe(self.lm.model, torch.tensor([new]), cache.get_seq_length())
        except Exception:
            self.store.release(session, ok=False)
            raise
        return running

    def _read(self, running: Running) -> None:
        """Feed the next chunk of the prompt; after the last one, close the prompt and sample the first token.
        A turn cancelled while reading is dropped, its session back to the state before the turn."""
        session, cache = running.session, running.session.cache
        assert cache is not None
        if running.job.cancelled.is_set():
            self.store.release(session, ok=False)
            running.job.emit("error", ApiError(503, "the request was cancelled", kind="server_error"))
            running.reading, running.token = False, None
            return
        try:
            if running.pending:
                chunk, running.pending = running.pending[: self.chunk_size], running.pending[self.chunk_size :]
                session.logits = prefill(self.lm.model, cache, torch.tensor([chunk]), self.chunk_size, session.logits)
                session.tokens = np.concatenate([session.tokens, np.asarray(chunk, dtype=np.int64)])
                if running.pending:
                    return
            if running.fresh:
                cache.end_context()  # the first prompt is the context a compressing policy compresses
                if cache.policy.probes_question:  # its last tokens (the question) pick the blocks read next
                    prompt = torch.tensor([running.prompt])
                    probe_question(self.lm.model, cache, prompt, torch.zeros(1, 0, dtype=torch.long))
            else:
                close_turn(cache)
            session.prompt_len = len(session.tokens)
            assert session.logits is not None
            running.reading = False
            self._pick(running, session.logits)
        except Exception:
            self.store.release(session, ok=False)
            raise
        if running.token is None:
            self._end(running)

    def _pick(self, turn: Running, logits: torch.Tensor) -> None:
        """Sample the next token from ``logits``; set ``turn.token`` to feed it, or leave it None when done."""
        turn.token = None
        if turn.job.cancelled.is_set():
            turn.finish = "cancelled"
            return
        token = sample(logits, turn.config, turn.generator)
        if not turn.ids:
            self.metrics.first_token(time.perf_counter() - turn.job.submitted)
        if token in self.stops and not turn.job.turn.ignore_eos:
            turn.finish = "stop"
            return
        turn.ids.append(token)
        turn.text = turn.delta.text(turn.ids)
        hit = [turn.text.index(s) for s in turn.job.turn.stop if s in turn.text]
        if hit:
            turn.text, turn.finish = turn.text[: min(hit)], "stop"
            return
        if piece := turn.delta.push(turn.text):
            turn.job.emit("text", piece)
        if len(turn.ids) < turn.config.max_new_tokens:
            turn.token = token

    def _feed(self, batch: list[Running]) -> None:
        """One decode step: feed every turn's pending token in one forward, then sample each turn's next one."""
        for turn in batch:
            cache, token = turn.session.cache, turn.token
            assert cache is not None and token is not None and turn.session.logits is not None
            if cache.policy.needs_surprise:  # the fed token's own surprise, from the logits that chose it
                logits = turn.session.logits
                cache.observe_surprise((torch.logsumexp(logits, dim=-1) - logits[token]).reshape(1))
            if cache.policy.needs_token_text:
                cache.observe_tokens(cache.get_seq_length(), token_pieces(cache, [token]))
        caches = [t.session.cache for t in batch if t.session.cache is not None]
        tokens = [t.token for t in batch if t.token is not None]
        logits = decode_step(self.lm, caches, tokens, self.fused)
        self.metrics.decode_step(len(batch))
        for turn, token, row in zip(batch, tokens, logits, strict=True):
            turn.session.tokens = np.append(turn.session.tokens, token)
            turn.session.logits = row
            self._pick(turn, row)
            if turn.token is None:
                self._end(turn)

    def _end(self, turn: Running) -> None:
        if piece := turn.delta.rest(turn.text):
            turn.job.emit("text", piece)
        self.store.release(turn.session, ok=self.session_memory)  # durable: on disk before the response ends
        self.metrics.turn(turn.start["prompt_tokens"], turn.start["cached_tokens"], len(turn.ids))
        done = {"finish_reason": turn.finish, "completion_tokens": len(turn.ids), "text": turn.text, "ids": turn.ids}
        turn.job.emit("done", done)
