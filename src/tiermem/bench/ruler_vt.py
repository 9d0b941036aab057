"""RULER's variable tracking (``vt``): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in prose; the model
names every variable that holds the value.

Template, answer prefix, one chain of 4 hops, 5-letter upper-case names, a 5-digit value, the one in-context example
and the essay insertion are RULER's (``scripts/data/synthetic/variable_tracking.py``, ``constants.py``).

Departures from the reference code:
- RULER's ``vt`` hides the chain in repetitive noise (``type_haystack: noise``); tiermem hides it in the prose pool
  (RULER's ``essay`` haystack type, which its code supports but its default suite does not use), as the issue asks.
- The in-context example is built over 250 words of prose rather than RULER's 500-token noise prompt, and is drawn
  afresh per sample (RULER re-randomises its names and value per sample too).
- A name that is an English word, or that the prose already contains, would be ambiguous under RULER's
  case-insensitive substring scoring; tiermem draws again.
"""

from __future__ import annotations

import random
import string
from functools import cache

from tiermem.bench.haystack import haystack_sentences, pool_vocabulary
from tiermem.bench.ruler_common import Draft, insert_at_depths

HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "Find all variables that are assigned the value {query} in the text above."
PREFIX = "According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are:"  # noqa: E501
TOKENS_TO_GENERATE = 30  # RULER's tokens_to_generate for variable tracking
NUM_HOPS = 4
EXAMPLE_WORDS = 250  # the solved example's haystack: ~330 SmolLM2 tokens


@cache
def _word_pieces() -> frozenset[str]:
    """Every 5-letter run inside a word of the pool vocabulary (``therm`` of ``thermal``)."""
    return frozenset(w[i : i + 5] for w in pool_vocabulary() for i in range(len(w) - 4))


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """``count`` distinct 5-letter upper-case names, none inside an English word of the pool or already ``taken``
    (scoring ignores case, so ``THERM`` would be found in an answer that says ``thermal``)."""
    pieces = _word_pieces()
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in taken and name.lower() not in pieces and name not in out:
            out.append(name)
    return out


def _chain(rng: random.Random, taken: set[str]) -> tuple[list[str], str, list[str]]:
    """(names, value, statements) of one chain of :data:`NUM_HOPS` hops."""
    names = _names(rng, NUM_HOPS + 1, taken)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(NUM_HOPS)]
    return names, value, statements


def _body(rng: random.Random, prose: list[str], statements: list[str]) -> str:
    return insert_at_depths(rng, prose, [statement + "." for statement in statements])


def build_vt(seed: str, words: int) -> Draft:
    """The vt instance of ``seed`` over ``words`` words of prose (draws first, as in ``build_niah``)."""
    rng = random.Random(seed)
    example_names, example_value, example_statements = _chain(rng, set())
    names, value, statements = _chain(rng, set(example_names))
    while value == example_value:
        value = str(rng.randint(10000, 99999))
        statements[0] = f"VAR {names[0]} = {value}"
    example_rng, depth_rng = random.Random(rng.random()), random.Random(rng.random())
    example_prose = haystack_sentences(f"{seed}/example", EXAMPLE_WORDS)
    example = (
        HEAD
        + _body(example_rng, example_prose, example_statements)
        + "\nQuestion: "
        + QUESTION.format(query=example_value)
        + " Answer: "
        + PREFIX.format(num_v=NUM_HOPS + 1, query=example_value)
        + " "
        + " ".join(example_names)
        + "\n"
    )
    prose = haystack_sentences(f"{seed}/haystack", words)
    context = example + HEAD + _body(depth_rng, prose, statements)
    # Each name is assigned once and read by the next statement; the value is written once.
    occurrences = {name: 2 for name in names[:-1]} | {names[-1]: 1, value: 1}
    return Draft(
        context=context,
        question=QUESTION.format(query=value),
        answer_prefix=PREFIX.format(num_v=NUM_HOPS + 1, query=value),
        answers=tuple(names),
        occurrences=occurrences,
    )
