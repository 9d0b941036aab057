"""Sentence boundaries from decoded token text, robust to byte-level BPE.

SentenceKV's reference code finds sentence ends with ``tokenizer.convert_tokens_to_ids(".")`` and friends, which
with byte-level BPE misses tokens such as ``".\\n"`` or ``'."'`` and maps ``"\\n\\n"`` to the unknown token. Here a
token ends a sentence when its *decoded text*, stripped of trailing spaces and closing quotes or brackets, ends
with sentence punctuation, or when it contains a blank line.
"""

from __future__ import annotations

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
