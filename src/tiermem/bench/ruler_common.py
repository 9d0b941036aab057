"""Pieces the RULER-style tasks share: a task's draft, needle placement at RULER's depths, and random values.

RULER: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", COLM 2024,
arXiv:2404.06654; reference code github.com/NVIDIA/RULER (``scripts/data/synthetic``).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

from tiermem.bench.tasks import ADJECTIVES, NOUNS

# RULER places needles at depths drawn from 40 evenly spaced percentages (np.linspace(0, 100, 40), rounded).
DEPTHS = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class Draft:
    """One task instance before its length is checked: the prompt's parts, the answers, and how often each answer
    must occur in the context (1 for a needle: a second copy in the prose would make the task ambiguous)."""

    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    occurrences: dict[str, int] = field(default_factory=dict)  # answer -> count it must have in the context


def singular(template: str) -> str:
    """RULER's rewrite of its niah template when one value is asked for (``niah.py``, ``generate_input_output``)."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def insert_at_depths(rng: random.Random, sentences: list[str], needles: list[str]) -> str:
    """RULER's essay insertion: each needle goes between sentences at a depth drawn (without replacement) from
    :data:`DEPTHS`; the needles keep their order, the depths are sorted."""
    positions = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(needles)))
    bounds = [0, *positions, len(sentences)]
    parts: list[str] = []
    for i in range(1, len(bounds)):
        parts.append(" ".join(sentences[bounds[i - 1] : bounds[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(part for part in parts if part)


def random_value(rng: random.Random, kind: str) -> str:
    """A needle key or value as RULER draws it: ``numbers`` (7 digits), ``words`` (adjective-noun), ``uuids``."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}")


def distinct(rng: random.Random, kind: str, count: int, taken: set[str] | None = None) -> list[str]:
    """``count`` different random values, none of them in ``taken``."""
    seen = set(taken or ())
    out: list[str] = []
    while len(out) < count:
        value = random_value(rng, kind)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def join_query(keys: list[str]) -> str:
    """RULER's query for several keys: ``a, b, and c`` (``a, and b`` for two); one key is itself."""
    return ", ".join(keys[:-1]) + ", and " + keys[-1] if len(keys) > 1 else keys[0]
