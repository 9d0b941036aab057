"""Long-context tasks generated locally and deterministically from a seed.

- ``passkey``: a 5-digit pass key hidden in repetitive filler (Mohtashami & Jaggi 2023, as used by LongLoRA).
- ``needle``: one 7-digit "special magic number" hidden in real prose (RULER's ``niah_single``, essay haystack).
- ``multikey``: the same with three distractor needles under other keys (RULER's ``niah_multikey_1``).

Scoring follows RULER's ``string_match_all``: every reference string must appear in the answer (case-insensitive).
The RULER-style suite (``niah_*``, ``vt``, ``cwe``, ``fwe``, ``qa``) lives in :mod:`tiermem.bench.ruler`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tiermem.bench.haystack import PASSKEY_FILLER, prose_sentences
from tiermem.errors import TiermemError

TASKS = ("passkey", "needle", "multikey")
ADJECTIVES = [
    "amber",
    "ancient",
    "bitter",
    "brave",
    "calm",
    "clever",
    "crimson",
    "curious",
    "dusty",
    "eager",
    "fierce",
    "gentle",
    "golden",
    "hollow",
    "humble",
    "icy",
    "jolly",
    "lively",
    "lonely",
    "lucky",
    "misty",
    "noble",
    "odd",
    "patient",
    "quiet",
    "rapid",
    "rusty",
    "silent",
    "silver",
    "sleepy",
    "smooth",
    "steady",
    "sturdy",
    "swift",
    "tender",
    "tidy",
    "vivid",
    "wandering",
    "wild",
    "witty",
]
NOUNS = [
    "anchor",
    "badger",
    "beacon",
    "canyon",
    "cedar",
    "comet",
    "dragon",
    "falcon",
    "feather",
    "forest",
    "glacier",
    "harbor",
    "island",
    "jaguar",
    "lantern",
    "meadow",
    "mirror",
    "nebula",
    "otter",
    "pebble",
    "pepper",
    "quartz",
    "raven",
    "river",
    "saddle",
    "sparrow",
    "summit",
    "tiger",
    "tulip",
    "violin",
    "walrus",
    "willow",
    "window",
    "zebra",
]
NEEDLE_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)


@dataclass(frozen=True)
class Sample:
    """One prompt: a context with the needle(s) inside, a question, and the strings a right answer contains."""

    task: str
    length: int  # requested prompt length in tokens (the real count is measured after templating)
    depth: float | None  # where the needle sits, as a fraction of the context (None: drawn per needle, as RULER)
    index: int
    context: str
    question: str
    answer_prefix: str  # the start of the answer, written for the model (RULER's answer prefix)
    answers: tuple[str, ...]
    metric: str = "all"  # "all": RULER's string_match_all, "part": string_match_part (RULER's qa)

    def score(self, prediction: str) -> float:
        """RULER's per-sample score in [0, 1] under this sample's metric."""
        match = string_match_part if self.metric == "part" else string_match_all
        return match(prediction, self.answers)


def score(answer: str, references: tuple[str, ...]) -> bool:
    """RULER's string_match_all: every reference appears in the answer, case-insensitively."""
    return all(ref.lower() in answer.lower() for ref in references)


def string_match_all(prediction: str, references: tuple[str, ...]) -> float:
    """RULER's ``string_match_all`` for one sample: the fraction of references found in the prediction."""
    return sum(ref.lower() in prediction.lower() for ref in references) / len(references)


def string_match_part(prediction: str, references: tuple[str, ...]) -> float:
    """RULER's ``string_match_part`` for one sample (its qa metric): 1 if any reference is in the prediction."""
    return float(any(ref.lower() in prediction.lower() for ref in references))


class _Counter:
    """Token counts of text pieces, memoized (fillers repeat)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self.memo:
            self.memo[text] = len(self.tokenizer(" " + text, add_special_tokens=False).input_ids)
        return self.memo[text]


def _fill(pieces: list[str], budget: int, count: _Counter) -> list[str]:
    """Take pieces (cycling) until their token count reaches ``budget``."""
    out: list[str] = []
    used = 0
    i = 0
    while used < budget or not out:
        piece = pieces[i % len(pieces)]
        out.append(piece)
        used += count(piece)
        i += 1
    return out


def _insert(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Put each needle before the sentence at its relative depth."""
    placed = list(sentences)
    for depth, needle in sorted(needles, key=lambda item: -item[0]):  # deepest first keeps earlier indices valid
        placed.insert(round(depth * len(sentences)), needle)
    return " ".join(placed)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


# Room left for the chat template's own tokens (role headers, special tokens).
_TEMPLATE_TOKENS = 32
_MIN_LENGTH = 128


Built = tuple[str, str, str, tuple[str, ...]]  # context, question, answer prefix, references


def _passkey(rng: random.Random, length: int, depth: float, count: _Counter) -> Built:
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question, prefix = "What is the pass key?", "The pass key is"
    overhead = sum(map(count, (PASSKEY_INTRO, needle, question, prefix))) + _TEMPLATE_TOKENS
    filler = _fill([PASSKEY_FILLER], length - overhead, count)
    return PASSKEY_INTRO + _insert(filler, [(depth, needle)]), question, prefix, (key,)


def _needles(rng: random.Random, length: int, depth: float, count: _Counter, distractors: int) -> Built:
    keys: list[str] = []
    while len(keys) < 1 + distractors:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
    placed = [(depth, needles[0])] + [(rng.random(), n) for n in needles[1:]]
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    overhead = sum(map(count, (NEEDLE_INTRO, question, prefix, *needles))) + _TEMPLATE_TOKENS
    prose = _fill(prose_sentences(rng.randrange(1000)), length - overhead, count)
    return NEEDLE_INTRO + _insert(prose, placed), question, prefix, (values[0],)


def make_sample(
    task: str, tokenizer: PreTrainedTokenizerBase, length: int, depth: float, index: int, seed: int = 0
) -> Sample:
    """The ``index``-th sample of ``task`` at ``length`` tokens and ``depth``: the same inputs give the same text."""
    builders: dict[str, Callable[[random.Random, int, float, _Counter], Built]] = {
        "passkey": _passkey,
        "needle": lambda r, n, d, c: _needles(r, n, d, c, distractors=0),
        "multikey": lambda r, n, d, c: _needles(r, n, d, c, distractors=3),
    }
    if task not in builders:
        raise TiermemError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise TiermemError(f"depth must be in [0, 1], got {depth}")
    if length < _MIN_LENGTH:
        raise TiermemError(f"length {length} is too short for a task prompt (at least {_MIN_LENGTH} tokens)")
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{index}")
    context, question, prefix, answers = builders[task](rng, length, depth, _Counter(tokenizer))
    return Sample(task, length, depth, index, context, question, prefix, answers)
