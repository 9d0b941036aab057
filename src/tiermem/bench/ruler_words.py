"""RULER's aggregation tasks: common words extraction (``cwe``) and frequent words extraction (``fwe``).

Neither hides anything in prose: ``cwe`` is a numbered list of words where 10 words appear 30 times and the rest 3
times (6 and 1 below 4k tokens), after one solved example; ``fwe`` is "coded text" of random 6-letter words drawn
from a Zipf (zeta, alpha 2) distribution, whose three most frequent words are asked for (the most frequent one is
``...``, noise to ignore). Templates, frequencies, example and vocabulary size (``length // 50``) are RULER's
(``scripts/data/synthetic/common_words_extraction.py``, ``freq_words_extraction.py``, ``constants.py``).

Departures from the reference code:
- ``cwe``'s words are the pool vocabulary of :mod:`tiermem.bench.haystack` (18k English words of 4-12 letters from
  the Lee and Wikipedia prose) instead of the ``wonderwords`` lists, which tiermem does not install.
- RULER scores by substring, so a list word inside another (``port`` in ``report``) or inside the instructions would
  be found in an answer that does not name it; tiermem leaves such words out of the list.
"""

from __future__ import annotations

import random
import string

from tiermem.bench.haystack import pool_vocabulary
from tiermem.bench.ruler_common import Draft

CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "What are the 10 most common words in the above list?"
CWE_PREFIX = "The top 10 words that appear most often in the list are:"
CWE_TOKENS_TO_GENERATE = 120
NUM_COMMON = 10
EXAMPLE_WORDS = 40

FWE_HEAD = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = "According to the coded text above, the three most frequently appeared words are:"
FWE_TOKENS_TO_GENERATE = 50
CODED_WORD_LENGTH = 6
ALPHA = 2.0


def cwe_frequencies(length: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """RULER's (common, uncommon) repeats for the example and for the task; RULER switches below 4096 tokens."""
    return ((3, 1), (6, 1)) if length < 4096 else ((10, 3), (30, 3))


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _pick(rng: random.Random, count: int) -> list[str]:
    """``count`` vocabulary words, none inside the instructions, none inside another picked word or holding one."""
    template = (CWE_HEAD + CWE_QUESTION + CWE_PREFIX).lower()
    vocabulary = [w for w in pool_vocabulary() if w not in template]
    picked: list[str] = []
    for word in rng.sample(vocabulary, min(len(vocabulary), 2 * count + 100)):
        if not any(word in other or other in word for other in picked):
            picked.append(word)
            if len(picked) == count:
                return picked
    raise ValueError(f"the vocabulary has too few distinct words for {count} list entries")


def _word_list(rng: random.Random, words: list[str], repeats: tuple[int, int]) -> list[str]:
    listed = words[:NUM_COMMON] * repeats[0] + words[NUM_COMMON:] * repeats[1]
    rng.shuffle(listed)
    return listed


def build_cwe(seed: str, words: int, length: int) -> Draft:
    """The cwe instance of ``seed`` with ``words`` distinct words in its list (``length`` picks the frequencies)."""
    rng = random.Random(seed)
    example_repeats, repeats = cwe_frequencies(length)
    picked = _pick(rng, EXAMPLE_WORDS + max(words, NUM_COMMON + 1))
    example_words, task_words = picked[:EXAMPLE_WORDS], picked[EXAMPLE_WORDS:]
    example = (
        CWE_HEAD
        + _numbered(_word_list(rng, example_words, example_repeats))
        + "\nQuestion: "
        + CWE_QUESTION
        + " Answer: "
        + CWE_PREFIX
        + " "
        + _numbered(example_words[:NUM_COMMON])
        + "\n"
    )
    context = example + CWE_HEAD + _numbered(_word_list(rng, task_words, repeats))
    occurrences = {w: repeats[0] for w in task_words[:NUM_COMMON]}  # the other words are substring-free by _pick
    return Draft(context, CWE_QUESTION, CWE_PREFIX, tuple(task_words[:NUM_COMMON]), occurrences)


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (scipy's ``zeta`` in RULER): partial sum plus the integral of the tail."""
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


_ZETA = zeta(ALPHA)


def build_fwe(seed: str, words: int, length: int) -> Draft:
    """The fwe instance of ``seed`` with about ``words`` coded words (``length // 50`` is the vocabulary size)."""
    rng = random.Random(seed)
    size = max(length // 50, 5)
    vocabulary: set[str] = set()
    while len(vocabulary) < size:
        vocabulary.add("".join(rng.choices(string.ascii_lowercase, k=CODED_WORD_LENGTH)))
    ranked = sorted(vocabulary)
    rng.shuffle(ranked)
    ranked[0] = "..."  # RULER: the top-ranked word is noise, to be ignored
    counts = [int(words * k**-ALPHA / _ZETA) for k in range(1, len(ranked) + 1)]
    text = [word for word, count in zip(ranked, counts, strict=True) for _ in range(count)]
    rng.shuffle(text)
    context = FWE_HEAD + " ".join(text)
    occurrences = {ranked[k]: counts[k] for k in (1, 2, 3)}
    return Draft(context, FWE_QUESTION, FWE_PREFIX, tuple(ranked[1:4]), occurrences)
