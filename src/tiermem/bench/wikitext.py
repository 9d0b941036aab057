"""English Wikipedia prose from the shortened article dump that ships as test data in the ``gensim`` wheel.

The file (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, 1.7 MB, 206 pages of a 2016 dump)
sits beside the Lee corpus that :mod:`tiermem.bench.haystack` already reads, so it costs no extra download. Its 97
articles give ~370k words of prose once the wiki markup is stripped: with the Lee corpus (~60k words) a 128k-token
haystack needs no text twice. The text is Wikipedia's, under CC BY-SA 3.0.

The markup is stripped with regular expressions, not a wikitext parser: templates, tables, references, comments,
file and category links and HTML tags are dropped, links keep their label, and only paragraph lines are kept (no
headings, lists or table rows). A paragraph that still holds markup characters is dropped whole rather than
half-cleaned, so a few paragraphs of each article are lost; what remains is plain prose.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path

from tiermem.errors import TiermemError

DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MIN_PARAGRAPH_CHARS = 200  # shorter lines are captions, list items or stubs, not prose paragraphs
_NESTED = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}|\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)  # innermost template or table
# [[File:...]], [[Category:...]] and interlanguage links, whose captions may hold links of their own
_SPECIAL_LINK = re.compile(
    r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):(?:[^\[\]]|\[\[[^\[\]]*\]\])*\]\]", re.IGNORECASE
)
_SUBSTITUTIONS = (
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
)
_LINKS = (
    (re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]"), r"\2"),  # [[target|label]] -> label
    (re.compile(r"\[\[([^\[\]]*)\]\]"), r"\1"),  # [[target]] -> target
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),  # [url label] -> label
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"<[^>]+>"), ""),
)
_LEFTOVER_MARKUP = re.compile(r"[{}\[\]|<>]")


def dump_path(test_data: Path) -> Path:
    path = test_data / DUMP_NAME
    if not path.is_file():
        raise TiermemError(f"Wikipedia test dump not found at {path} (pip install --no-deps gensim==4.4.0)")
    return path


def clean_wikitext(text: str) -> list[str]:
    """The prose paragraphs of one article's wikitext, markup removed."""
    text = html.unescape(text)
    for pattern, repl in _SUBSTITUTIONS:
        text = pattern.sub(repl, text)
    while True:  # templates and tables nest: remove the innermost ones until none is left
        stripped = _NESTED.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = _SPECIAL_LINK.sub("", text)
    for pattern, repl in _LINKS:
        text = pattern.sub(repl, text)
    text = text.replace("'''", "").replace("''", "")
    paragraphs = []
    for line in text.split("\n"):
        line = line.strip()
        if len(line) < _MIN_PARAGRAPH_CHARS or line[0] in "=*#:;|!{}[" or _LEFTOVER_MARKUP.search(line):
            continue
        paragraphs.append(re.sub(r"\s+", " ", line))
    return paragraphs


@cache
def wiki_articles(test_data: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(title, paragraphs) of every main-namespace article that is not a redirect, in dump order (~2.5 s)."""
    articles = []
    with bz2.open(dump_path(test_data)) as handle:
        for _, element in ET.iterparse(handle):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.findtext("{*}ns")
            title = element.findtext("{*}title") or ""
            text = element.findtext("{*}revision/{*}text") or ""
            if namespace == "0" and not text.lstrip().lower().startswith("#redirect"):
                paragraphs = clean_wikitext(text)
                if paragraphs:
                    articles.append((title, tuple(paragraphs)))
            element.clear()  # the dump is parsed as a stream: drop each page once read
    return tuple(articles)
