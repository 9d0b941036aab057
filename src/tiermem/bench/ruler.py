"""The RULER-style suite: its tasks, the length fit, and one entry point for every bench task.

``tiermem bench --suite ruler`` runs :data:`SUITES` ``["ruler"]``: six needle tasks, variable tracking, common and
frequent words extraction and question answering (see :mod:`tiermem.bench.ruler_niah`, ``ruler_vt``, ``ruler_words``,
``ruler_qa`` for each task and where it departs from RULER). Samples are deterministic under the seed.

Length: RULER binary-searches the haystack size so that prompt plus generated tokens fit ``max_seq_length``; tiermem
fits the prompt alone to the requested length (as its classic tasks do), by a secant search on the haystack size
that lands the prompt text within 1% under ``length - 32`` tokens (32 are left for the chat template's own tokens).
A draw whose answers the prose already contains is drawn again (up to 8 times).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from transformers import PreTrainedTokenizerBase

from tiermem.bench import ruler_niah, ruler_qa, ruler_vt, ruler_words
from tiermem.bench.ruler_common import Draft
from tiermem.bench.tasks import TASKS as CLASSIC_TASKS
from tiermem.bench.tasks import Sample, make_sample
from tiermem.errors import TiermemError

TEMPLATE_TOKENS = 32  # room for the chat template's role headers and special tokens
TOLERANCE = 0.01  # the fit stops once the prompt text is within 1% under its target
MIN_LENGTH = 1024  # vt's and cwe's solved examples alone take a few hundred tokens
ATTEMPTS = 8
CLASSIC_NEW_TOKENS = 16  # the classic tasks' answers are one short number


@dataclass(frozen=True)
class RulerTask:
    """One suite task: ``build(seed, size, length)`` makes a draft with ``size`` haystack units (words of prose, list
    words or documents); ``unit_tokens`` is a first guess of their size in tokens, for the fit."""

    build: Callable[[str, int, int], Draft]
    unit_tokens: float
    tokens_to_generate: int  # RULER's per-task generation length
    metric: str = "all"  # "all": string_match_all, "part": string_match_part


def _niah(name: str) -> RulerTask:
    spec = ruler_niah.NIAH_SPECS[name]
    return RulerTask(lambda seed, n, _: ruler_niah.build_niah(spec, seed, n), 1.3, ruler_niah.TOKENS_TO_GENERATE)


RULER_TASKS: dict[str, RulerTask] = {name: _niah(name) for name in ruler_niah.NIAH_SPECS} | {
    "vt": RulerTask(lambda seed, n, _: ruler_vt.build_vt(seed, n), 1.3, ruler_vt.TOKENS_TO_GENERATE),
    "cwe": RulerTask(ruler_words.build_cwe, 12.0, ruler_words.CWE_TOKENS_TO_GENERATE),
    "fwe": RulerTask(ruler_words.build_fwe, 2.5, ruler_words.FWE_TOKENS_TO_GENERATE),
    "qa": RulerTask(lambda seed, n, _: ruler_qa.build_qa(seed, n), 200.0, ruler_qa.TOKENS_TO_GENERATE, "part"),
}
SUITES: dict[str, tuple[str, ...]] = {"ruler": tuple(RULER_TASKS), "classic": CLASSIC_TASKS}
ALL_TASKS = (*CLASSIC_TASKS, *RULER_TASKS)


def tokens_to_generate(task: str) -> int:
    """How many tokens a task's answer may take by default (RULER's value for suite tasks)."""
    return RULER_TASKS[task].tokens_to_generate if task in RULER_TASKS else CLASSIC_NEW_TOKENS


def uses_depth(task: str) -> bool:
    """Classic tasks put their needle at the sweep's depths; suite tasks draw depths per needle, as RULER does."""
    return task in CLASSIC_TASKS


def prompt_text(draft: Draft) -> str:
    """The text the model reads, about as the prompt styles join it (for counting tokens)."""
    return f"{draft.context}\n\n{draft.question} {draft.answer_prefix}"


def fit(build: Callable[[int], Draft], count: Callable[[str], int], target: int, guess: int) -> Draft:
    """The draft of the largest size whose prompt text is at most ``target`` tokens, found by a secant search
    (tokens grow about linearly with the size); stops within :data:`TOLERANCE` of the target."""
    measured: dict[int, tuple[int, Draft]] = {}

    def measure(n: int) -> int:
        if n not in measured:
            draft = build(n)
            measured[n] = (count(prompt_text(draft)), draft)
        return measured[n][0]

    first = max(1, guess // 2)
    while measure(first) > target and first > 1:  # even the first guess is too long: halve until it fits
        first //= 2
    if measure(first) > target:
        raise TiermemError(f"{target + TEMPLATE_TOKENS} tokens are too few for this task's fixed text")
    for _ in range(12):
        under = max(n for n, (t, _) in measured.items() if t <= target)
        over = min((n for n, (t, _) in measured.items() if t > target), default=None)
        tokens = measured[under][0]
        if tokens >= target * (1 - TOLERANCE) or (over is not None and over - under <= 1):
            break
        others = [n for n in measured if n != under]
        ref = min(others, key=lambda n: abs(n - under)) if others else None
        slope = (measured[ref][0] - tokens) / (ref - under) if ref is not None else tokens / under
        step = max(1, int((target - tokens) / max(slope, 1e-3)))
        measure(under + step if over is None else min(under + step, over - 1))
    best = max(n for n, (t, _) in measured.items() if t <= target)
    return measured[best][1]


def _build(spec: RulerTask, seed: str, size: int, length: int) -> Draft:
    return spec.build(seed, size, length)


def _occurrences_ok(draft: Draft) -> bool:
    """Every answer (and every other checked string) occurs in the context exactly as often as the task put it."""
    context = draft.context.lower()
    checked = set(draft.occurrences)
    if not set(draft.answers) <= checked:
        return False
    return all(context.count(text.lower()) == times for text, times in draft.occurrences.items())


def make_ruler_sample(task: str, tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0) -> Sample:
    """The ``index``-th sample of suite ``task`` at ``length`` prompt tokens: the same inputs give the same text."""
    if task not in RULER_TASKS:
        raise TiermemError(f"unknown suite task '{task}': use one of {', '.join(RULER_TASKS)}")
    if length < MIN_LENGTH:
        raise TiermemError(f"length {length} is too short for suite task '{task}' (at least {MIN_LENGTH} tokens)")
    spec = RULER_TASKS[task]
    target = length - TEMPLATE_TOKENS

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    for attempt in range(ATTEMPTS):
        key = f"{seed}/{task}/{length}/{index}/{attempt}"
        draft = fit(partial(_build, spec, key, length=length), count, target, int(target / spec.unit_tokens))
        if _occurrences_ok(draft):
            d = draft
            return Sample(task, length, None, index, d.context, d.question, d.answer_prefix, d.answers, spec.metric)
    raise TiermemError(f"no {task} sample of {length} tokens without its answer elsewhere in the prose")


def make_any_sample(
    task: str, tokenizer: PreTrainedTokenizerBase, length: int, depth: float | None, index: int, seed: int = 0
) -> Sample:
    """A sample of any bench task: classic tasks at ``depth``, suite tasks with RULER's own depths."""
    if task in RULER_TASKS:
        return make_ruler_sample(task, tokenizer, length, index, seed)
    if depth is None:
        raise TiermemError(f"task '{task}' needs a needle depth")
    return make_sample(task, tokenizer, length, depth, index, seed)
