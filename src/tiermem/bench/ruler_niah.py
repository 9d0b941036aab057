"""RULER's needle-in-a-haystack family over real prose: one or several "special magic" needles, asked for by key.

Templates, needle sentence, the singular rewrite, adjective-noun keys, 7-digit / UUID values and the depth grid are
RULER's (``scripts/data/synthetic/niah.py``, ``constants.py``). ``niah_number`` is RULER's ``niah_single_2``,
``niah_uuid`` its ``niah_single_3``, ``niah_multikey`` / ``niah_multivalue`` / ``niah_multiquery`` its tasks of those
names (4 needles each). ``niah_word`` (an adjective-noun value) is a tiermem addition: RULER has the value type but no
task with it.

Departures from the reference code:
- The haystack is the Lee news and Wikipedia pool of :mod:`tiermem.bench.haystack`, not Paul Graham's essays (which
  RULER downloads; nothing is downloaded here). ``niah_single_1`` (repetitive noise) and ``niah_multikey_2/3`` (a
  haystack of needles) are not in the suite: tiermem's ``passkey`` task is the noise variant.
- RULER asks ``What ...? The special magic ...`` after the context; tiermem keeps the question and the answer prefix
  apart so policies can compress the context before they see the question (:mod:`tiermem.prompts`).
- A value or key that the prose already contains would make the answer ambiguous; RULER does not check, tiermem
  draws again (:func:`tiermem.bench.ruler.make_ruler_sample`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tiermem.bench.haystack import haystack_sentences
from tiermem.bench.ruler_common import Draft, distinct, insert_at_depths, join_query, singular

HEAD = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n"
)
QUESTION = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TOKENS_TO_GENERATE = 128  # RULER's tokens_to_generate for niah


@dataclass(frozen=True)
class NiahSpec:
    """RULER's niah arguments: value type, keys, values per key, keys asked for (keys are adjective-noun words)."""

    type_needle_v: str  # "numbers", "words" or "uuids"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


NIAH_SPECS = {
    "niah_number": NiahSpec("numbers"),
    "niah_word": NiahSpec("words"),
    "niah_uuid": NiahSpec("uuids"),
    "niah_multikey": NiahSpec("numbers", num_needle_k=4),
    "niah_multivalue": NiahSpec("numbers", num_needle_v=4),
    "niah_multiquery": NiahSpec("numbers", num_needle_k=4, num_needle_q=4),
}


def build_niah(spec: NiahSpec, seed: str, words: int) -> Draft:
    """The niah instance of ``seed`` over ``words`` words of prose.

    Every random draw comes before the haystack is read, so the needles, their relative depths and the question are
    the same whatever ``words`` is (the length fit changes only how much prose surrounds them).
    """
    rng = random.Random(seed)
    num_keys = max(spec.num_needle_k, spec.num_needle_q)
    keys = distinct(rng, "words", num_keys)
    values = [distinct(rng, spec.type_needle_v, spec.num_needle_v, taken=set(keys)) for _ in keys]
    needles = [
        NEEDLE.format(type_needle_v=spec.type_needle_v, key=key, value=value)
        for key, key_values in zip(keys, values, strict=True)
        for value in key_values
    ]
    rng.shuffle(needles)
    depth_rng = random.Random(rng.random())  # the depths, drawn from their own stream
    asked = rng.sample(range(num_keys), spec.num_needle_q)
    queries = [keys[i] for i in asked]
    answers = tuple(value for i in asked for value in values[i])
    type_v = spec.type_needle_v
    head, question, prefix = HEAD, QUESTION, PREFIX
    if spec.num_needle_q * spec.num_needle_v == 1:
        head, question, prefix = singular(head), singular(question), singular(prefix)
        type_v = type_v[:-1]  # "numbers" -> "number"
    query = join_query(queries)
    prose = haystack_sentences(f"{seed}/haystack", words)
    context = head.format(type_needle_v=type_v) + insert_at_depths(depth_rng, prose, needles)
    occurrences = {value: 1 for key_values in values for value in key_values}
    occurrences.update({key: spec.num_needle_v for key in keys})
    return Draft(
        context=context,
        question=question.format(type_needle_v=type_v, query=query),
        answer_prefix=prefix.format(type_needle_v=type_v, query=query),
        answers=answers,
        occurrences=occurrences,
    )
