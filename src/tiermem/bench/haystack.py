"""Filler text for long-context tasks: repetitive passkey filler, or real English prose.

The prose is the Lee news corpus (300 Australian Broadcasting Corporation news articles, ~60k words) that ships as
test data inside the ``gensim`` wheel; tiermem reads the file without importing gensim (install it with
``pip install --no-deps gensim``). No network access is needed at run time.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

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
