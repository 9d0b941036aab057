"""Sentence boundaries from decoded token text, robust to byte-level BPE.

SentenceKV's reference code finds sentence ends with ``tokenizer.convert_tokens_to_ids(".")`` and friends, which
with byte-level BPE misses tokens such as ``".\\n"`` or ``'."'`` and maps ``"\\n\\n"`` to the unknown token. Here a
token ends a sentence when its *decoded text*, stripped of trailing spaces and closing quotes or brackets, ends
with sentence punctuation, or when it contains a blank line.
"""

from __future__ import annotations

from collections.abc import Sequence

SENTENCE_PUNCTUATION = (".", "!", "?", "。", "！", "？", "…")
_CLOSERS = "\"')]}»”’ \t"


def ends_sentence(piece: str) -> bool:
    """Whether a token whose decoded text is ``piece`` ends a sentence."""
    if "\n\n" in piece:
        return True
    return piece.rstrip(_CLOSERS).endswith(SENTENCE_PUNCTUATION)


def sentence_ends(pieces: list[str]) -> list[int]:
    """Indices of the tokens (given as decoded text pieces) that end a sentence."""
    return [i for i, piece in enumerate(pieces) if ends_sentence(piece)]


def sentence_spans(ends: list[int], start: int, stop: int) -> list[tuple[int, int]]:
    """Split positions ``[start, stop)`` into sentences ``[a, b)`` closing after each end position in ``ends``."""
    spans = []
    first = start
    for end in ends:
        if start <= end < stop and end + 1 > first:
            spans.append((first, end + 1))
            first = end + 1
    if first < stop:
        spans.append((first, stop))
    return spans


def share_sentence_ends(layers: Sequence[object], kind: type) -> None:
    """Give every layer of type ``kind`` one shared list of sentence-ending positions (``sentence_end_positions``)."""
    ends: list[int] = []
    for layer in layers:
        if isinstance(layer, kind):
            layer.sentence_end_positions = ends  # type: ignore[attr-defined]


def record_sentence_ends(layers: Sequence[object], kind: type, start: int, pieces: list[str]) -> None:
    """Add the tokens at positions ``start, start+1, ...`` that end a sentence to the list the ``kind`` layers
    share (see :func:`share_sentence_ends`)."""
    for layer in layers:
        if isinstance(layer, kind):
            layer.sentence_end_positions.extend(start + i for i in sentence_ends(pieces))  # type: ignore[attr-defined]
            return  # the list is shared
