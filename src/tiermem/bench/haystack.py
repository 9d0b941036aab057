"""Filler text for long-context tasks: repetitive passkey filler, or real English prose.

The prose is the Lee news corpus (300 Australian Broadcasting Corporation news articles, ~60k words) that ships as
test data inside the ``gensim`` wheel; tiermem reads the file without importing gensim (install it with
``pip install --no-deps gensim``). No network access is needed at run time.

The RULER-style suite (:mod:`tiermem.bench.ruler`) draws from a larger pool: the Lee articles plus the 97 Wikipedia
articles of the dump in the same folder (:mod:`tiermem.bench.wikitext`), ~430k words in all. Its haystacks walk the
pool's documents in an order drawn from the sample's seed, each document once per pass, so a context repeats no text
until it is longer than the whole pool (576k tokens for SmolLM2's tokenizer); past that a new pass starts in a new
order.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from tiermem.bench.wikitext import wiki_articles
from tiermem.errors import TiermemError

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def prose_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise TiermemError("the prose haystack needs the gensim wheel's test data: pip install --no-deps gensim")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise TiermemError(f"prose corpus not found at {path}")
    return path


@cache
def prose_documents() -> tuple[tuple[str, ...], ...]:
    """The corpus as documents, each a tuple of sentences."""
    documents = []
    for line in prose_path().read_text(encoding="utf-8").splitlines():
        sentences = tuple(s.strip() for s in _SENTENCE_END.split(line.strip()) if s.strip())
        if sentences:
            documents.append(sentences)
    return tuple(documents)


def prose_sentences(start_document: int) -> list[str]:
    """All sentences of the corpus, starting at document ``start_document`` and wrapping around once."""
    documents = prose_documents()
    start = start_document % len(documents)
    ordered = documents[start:] + documents[:start]
    return [sentence for document in ordered for sentence in document]


def split_sentences(paragraph: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in _SENTENCE_END.split(paragraph.strip()) if s.strip())


@cache
def pool_documents() -> tuple[tuple[str, ...], ...]:
    """The suite's documents, each a tuple of sentences: the Lee articles, then the Wikipedia articles."""
    wiki = wiki_articles(prose_path().parent)
    articles = [tuple(s for paragraph in paragraphs for s in split_sentences(paragraph)) for _, paragraphs in wiki]
    return prose_documents() + tuple(a for a in articles if a)


@cache
def pool_passages() -> tuple[str, ...]:
    """Short documents for the QA task: each Lee article whole, and each Wikipedia paragraph."""
    lee = tuple(" ".join(document) for document in prose_documents())
    wiki = tuple(paragraph for _, paragraphs in wiki_articles(prose_path().parent) for paragraph in paragraphs)
    return lee + wiki


def shuffled_passes(items: int, seed: str) -> Iterator[int]:
    """Indices ``0..items-1`` in a seeded order, then again in another order, and so on without end."""
    rng = random.Random(seed)
    while True:
        order = list(range(items))
        rng.shuffle(order)
        yield from order


def haystack_sentences(seed: str, words: int) -> list[str]:
    """The first ``words`` words of the pool's documents walked in the order :func:`shuffled_passes` draws, as
    sentences; the last one is cut at the word count (RULER also cuts its essay haystack at a word count)."""
    documents = pool_documents()
    out: list[str] = []
    left = words
    for index in shuffled_passes(len(documents), seed):
        for sentence in documents[index]:
            if left <= 0:
                return out
            taken = sentence.split(" ")
            out.append(sentence if len(taken) <= left else " ".join(taken[:left]))
            left -= len(taken)
    raise AssertionError("unreachable: the passes never end")


@cache
def pool_vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of 4 to 12 letters in the pool, sorted: real English words for word-list tasks."""
    words = {w for doc in pool_documents() for s in doc for w in re.findall(r"\b[a-z]{4,12}\b", s)}
    return tuple(sorted(words))
