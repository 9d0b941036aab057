"""Prefill, decode and generate as small functions over a model, a :class:`TierCache` and a policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import PreTrainedModel

from tiermem.attention import patched_attention
from tiermem.cache import TierCache, store_for
from tiermem.decode_step import DECODE_STEPS, FusedDecoder, fused_decoder
from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import StoreConfig
from tiermem.kvstore.quant import kv_format
from tiermem.layer_info import describe_layers
from tiermem.memory.auto import Auto
from tiermem.memory.base import Policy
from tiermem.memory.layer import DEFAULT_CHUNK_TOKENS
from tiermem.models import LoadedModel
from tiermem.prompts import Prompt
from tiermem.stats import Stats, Stopwatch, peak_rss_bytes, reset_peak_rss
from tiermem.weights.resident import release_free_memory


@dataclass
class GenerationConfig:
    """How to generate. ``temperature=0`` is greedy; otherwise sample with nucleus ``top_p`` from ``seed``.

    ``question_aware=False`` (default) compresses the context before the question is read, as kvpress does;
    ``True`` compresses context and question together, SnapKV's own setting (the question steers the selection).
    """

    max_new_tokens: int = 32
    chunk_size: int = DEFAULT_CHUNK_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    question_aware: bool = False
    stop_on_eos: bool = True  # benchmarks set False to time exactly max_new_tokens
    kv_memory: int | None = None  # bytes of KV the run may hold in RAM; the rest goes to the disk store
    store: StoreConfig = field(default_factory=StoreConfig)  # block store backend and folder, KV buffer allocator
    decode_step: str = "auto"  # tiermem.decode_step.DECODE_STEPS: the fused step where it applies, or "python"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise TiermemError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.chunk_size < 1:
            raise TiermemError(f"chunk size must be at least 1, got {self.chunk_size}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise TiermemError("temperature must be >= 0 and top_p in (0, 1]")
        if self.kv_memory is not None and self.kv_memory < 1:
            raise TiermemError("the KV memory limit must be positive")
        if self.decode_step not in DECODE_STEPS:
            raise TiermemError(f"unknown decode step '{self.decode_step}': use one of {', '.join(DECODE_STEPS)}")


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    stats: Stats = field(repr=False)
    policy: Policy | None = field(default=None, repr=False)  # the policy that ran (``auto`` resolved)


def forward(model: PreTrainedModel, cache: TierCache, ids: torch.Tensor, every_position: bool = False) -> torch.Tensor:
    """Run ``ids`` (1, T) through the model; return the next-token logits of the last position (vocab,), or of
    every position (T, vocab) with ``every_position``."""
    start = cache.get_seq_length()
    positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    keep = 0 if every_position else 1
    out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0].float() if every_position else out.logits[0, -1].float()


def forward_token(model: PreTrainedModel, cache: TierCache, token: int) -> torch.Tensor:
    """One decode step through the model: the logits (vocab,) after ``token``."""
    return forward(model, cache, torch.tensor([[token]]))


def fused_token(decoder: FusedDecoder, cache: TierCache, token: int) -> torch.Tensor:
    """One decode step by the fused step: the logits (vocab,) after ``token``."""
    return decoder.step([cache], [token])[0]


def surprise(previous: torch.Tensor | None, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token | prefix) of each token of ``ids`` (T,), from the logits before it.

    ``previous`` (vocab,) predicted the first token (None at the start of the text: surprise 0); ``logits`` (T, vocab)
    are this chunk's, so row i predicts token i + 1.
    """
    predictors = logits[:-1] if previous is None else torch.cat([previous[None], logits[:-1]])
    targets = ids[1:] if previous is None else ids
    values = torch.logsumexp(predictors, dim=-1) - predictors.gather(1, targets[:, None])[:, 0]
    return values if previous is not None else torch.cat([torch.zeros(1), values])


def token_pieces(cache: TierCache, ids: list[int]) -> list[str]:
    """Each token's own decoded text (for policies that read it)."""
    tokenizer = cache.tokenizer
    if tokenizer is None:
        raise ValueError(f"policy '{cache.policy.name}' needs the tokenizer: build the TierCache with tokenizer=")
    return [tokenizer.decode([i]) for i in ids]


def prefill(
    model: PreTrainedModel, cache: TierCache, ids: torch.Tensor, chunk_size: int, previous: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Feed ``ids`` (1, T) in chunks of ``chunk_size``; peak activation memory follows the chunk, not T.

    For policies that need it, each chunk's surprise goes to the cache (``previous``: the logits before ``ids``).
    """
    logits = previous
    for chunk in ids.split(chunk_size, dim=1):
        if cache.policy.needs_token_text:
            cache.observe_tokens(cache.get_seq_length(), token_pieces(cache, chunk[0].tolist()))
        if cache.policy.needs_surprise:
            every = forward(model, cache, chunk, every_position=True)
            cache.observe_surprise(surprise(logits, every, chunk[0]))
            logits = every[-1]
        else:
            logits = forward(model, cache, chunk)
    return logits


PROBE_TAIL = 64  # without a separate question, the prompt's last tokens are what the answer is about


def probe_question(model: PreTrainedModel, cache: TierCache, context: torch.Tensor, question: torch.Tensor) -> None:
    """Let the policy look at the question (1, Tq) before it is read, or at the context's last ``PROBE_TAIL``
    tokens when there is no separate question (question-aware runs put it at the end of the context)."""
    if question.shape[1]:
        cache.probe(model, question, cache.get_seq_length())
    else:
        tail = context[:, -PROBE_TAIL:]
        cache.probe(model, tail, context.shape[1] - tail.shape[1])


def sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else temperature plus nucleus (top-p) sampling."""
    if config.temperature == 0:
        return int(logits.argmax())
    probs = (logits / config.temperature).softmax(dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > config.top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_token_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (lm.model.generation_config.eos_token_id, lm.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


class TextStream:
    """Decodes new tokens to text as they come, holding back an incomplete multi-byte character."""

    def __init__(self, lm: LoadedModel, on_text: Callable[[str], None] | None):
        self.tokenizer = lm.tokenizer
        self.on_text = on_text
        self.emitted = 0

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        text = self.text(ids)
        if self.on_text is not None and not text.endswith("\ufffd") and len(text) > self.emitted:
            self.on_text(text[self.emitted :])
            self.emitted = len(text)
        return text

    def flush(self, text: str) -> None:
        if self.on_text is not None and len(text) > self.emitted:
            self.on_text(text[self.emitted :])
            self.emitted = len(text)


def generate(
    lm: LoadedModel,
    prompt: Prompt,
    policy: Policy,
    config: GenerationConfig | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Result:
    """Answer ``prompt`` under ``policy``: prefill the context in chunks, let the policy compress it, read the
    question, then decode. ``on_text`` receives the answer's text piece by piece as it is generated."""
    config = config or GenerationConfig()
    context, question = prompt.context_ids, prompt.question_ids
    if config.question_aware:
        context, question = torch.cat([context, question], dim=1), question[:, :0]
    total = prompt.num_tokens + config.max_new_tokens
    if prompt.num_tokens == 0:
        raise TiermemError("the prompt is empty")
    infos = describe_layers(lm.model, config.store.kv_dtype)
    chosen = ""
    if isinstance(policy, Auto):  # resolved now that the prompt's length is known
        choice = policy.choose(infos, context.shape[1], total, config)
        policy, chosen = choice.policy, choice.reason
    policy.check(context.shape[1], total, lm.max_positions)

    stats = Stats(
        policy=repr(policy),
        prompt_tokens=prompt.num_tokens,
        context_tokens=context.shape[1],
        question_tokens=question.shape[1],
    )
    if chosen:
        stats.extra["auto"] = chosen
    # The formats that ran: weights (a dtype, int8 or int4-g<group>), activations, and how KV rows are stored.
    stats.extra.update(formats(lm, config.store.kv_dtype))
    store = store_for(policy, infos, context.shape[1], total, config.kv_memory, config.store, config.chunk_size)
    cache = TierCache(lm.model, policy, store, config.kv_memory, lm.tokenizer)
    try:
        return _run(lm, cache, context, question, config, stats, on_text)
    finally:
        cache.close()
        release_free_memory()  # the run's freed temporaries (~31 MiB for SmolLM2) back to the OS; milliseconds


def formats(lm: LoadedModel, kv_dtype: str) -> dict[str, str]:
    """The number formats a run uses, for the cost summary and ``--json``: ``weights_format``, ``compute_dtype``
    (activations) and ``kv_dtype`` (``auto`` resolved)."""
    compute = lm.model.dtype
    return {
        "weights_format": lm.weights_format,
        "compute_dtype": str(compute).removeprefix("torch."),
        "kv_dtype": kv_format(kv_dtype, compute).name,
    }


def _run(
    lm: LoadedModel,
    cache: TierCache,
    context: torch.Tensor,
    question: torch.Tensor,
    config: GenerationConfig,
    stats: Stats,
    on_text: Callable[[str], None] | None,
) -> Result:
    """Prefill, compress, read the question and decode (the body of :func:`generate`)."""
    total = context.shape[1] + question.shape[1] + config.max_new_tokens
    cache.plan(context.shape[1], total, config.chunk_size)
    generator = torch.Generator().manual_seed(config.seed)
    stops = stop_token_ids(lm)
    stream = TextStream(lm, on_text)
    prefill_clock, decode_clock = Stopwatch(), Stopwatch()
    reset_peak_rss()
    lm.reset_weight_stats()

    with torch.inference_mode(), patched_attention(lm.model):
        with prefill_clock:
            logits = prefill(lm.model, cache, context, config.chunk_size)
            cache.end_context()
            stats.kv_tokens = cache.kv_tokens()
            if cache.policy.probes_question:
                probe_question(lm.model, cache, context, question)
            if question.shape[1]:
                logits = prefill(lm.model, cache, question, config.chunk_size, logits)
        assert logits is not None
        fused, why = fused_decoder(lm, [cache], config.decode_step)
        stats.extra["decode_step"] = "fused" if fused is not None else f"python ({why})"
        step = partial(fused_token, fused, cache) if fused is not None else partial(forward_token, lm.model, cache)
        ids: list[int] = []
        finish, text = "length", ""
        while True:
            token = sample(logits, config, generator)
            if token in stops and config.stop_on_eos:
                finish = "eos"
                break
            ids.append(token)
            text = stream.push(ids)
            hit = [s for s in config.stop_strings if s in text]
            if hit:
                text, finish = text[: min(text.index(s) for s in hit)], "stop"
                break
            if len(ids) >= config.max_new_tokens:
                break
            with decode_clock:
                if cache.policy.needs_surprise:  # the generated token's own surprise
                    cache.observe_surprise((torch.logsumexp(logits, dim=-1) - logits[token]).reshape(1))
                if cache.policy.needs_token_text:
                    cache.observe_tokens(cache.get_seq_length(), token_pieces(cache, [token]))
                logits = step(token)
            stats.decode_steps += 1

    text = text if finish == "stop" else stream.text(ids)
    stream.flush(text)
    stats.new_tokens = len(ids)
    stats.kv_bytes_peak = cache.kv_bytes_peak()
    stats.kv_bytes_decode = cache.kv_bytes()
    stats.peak_rss_bytes = peak_rss_bytes()
    stats.prefill_seconds = prefill_clock.seconds
    stats.decode_seconds = decode_clock.seconds
    stats.extra.update({"kv_disk_bytes": cache.store.disk_bytes, "kv_disk_reads": cache.store.reads})
    stats.extra.update(lm.weight_stats())
    return Result(text=text, token_ids=ids, finish_reason=finish, stats=stats, policy=cache.policy)
