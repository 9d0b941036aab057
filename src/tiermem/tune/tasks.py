"""Fine-tuning tasks that ship offline: real labelled sentiment, held-out Wikipedia prose, or the user's own file.

``polarity-k16`` and ``polarity-k50`` use the sentence polarity data of Pang & Lee ("Seeing stars", ACL 2005; the
MR benchmark, Rotten Tomatoes review snippets, the same source SST-2 was built from). The ``gensim`` wheel, which
tiermem already installs for its prose haystacks, ships 200 of those sentences with their labels as test data
(``pang_lee_polarity.cor``, 100 negative, 100 positive, fastText ``__label__`` format). No other labelled text set
was found in an installable package; 200 sentences is small, so the sizes differ from MeZO's:

- a fixed test set of 50 sentences per class (100), drawn once with MeZO's first data seed (13);
- ``polarity-k16``: MeZO's few-shot setting, k = 16 training sentences per class from the other 100;
- ``polarity-k50``: the larger setting, all 50 remaining per class (MeZO's is k = 512, which 200 sentences cannot give).

The prompt is MeZO's SST-2 template (``large_models/templates.py``): ``"<sentence> It was"`` followed by a label word,
``" terrible"`` (0) or ``" great"`` (1); the model's logits on the label words classify.

``wiki-lm`` is language modelling on held-out prose: paragraphs of the Wikipedia dump in the same wheel
(:mod:`tiermem.bench.wikitext`), the first 80% of articles for training and the last 20% for the perplexity.

A path to a ``.jsonl`` file (one ``{"text": ..., "label": ...}`` per line, label a word) or a ``.txt`` file (one
paragraph per line, language modelling) is a task too: its last 20% is the test set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tiermem.errors import TiermemError

POLARITY_FILE = "pang_lee_polarity.cor"
DATA_SEED = 13  # MeZO's first data seed
SST2_TEMPLATE = "{text} It was"
SST2_WORDS = (" terrible", " great")
TEST_PER_CLASS = 50
WIKI_TRAIN, WIKI_TEST = 512, 64  # paragraphs


@dataclass(frozen=True)
class Example:
    """One example: ``label`` indexes ``Task.label_words`` (classification) or is -1 (language modelling)."""

    text: str
    label: int = -1


@dataclass(frozen=True)
class Task:
    """A task: ``kind`` is ``"classify"`` (prompt + label words, accuracy) or ``"lm"`` (perplexity)."""

    name: str
    kind: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    description: str
    template: str = "{text}"
    label_words: tuple[str, ...] = ()

    def prompt(self, example: Example) -> str:
        return self.template.format(text=example.text)


def _gensim_test_data() -> Path:
    from tiermem.bench.haystack import prose_path

    return prose_path().parent


@cache
def polarity_sentences() -> tuple[Example, ...]:
    """The 200 labelled sentences in file order (label 0 negative, 1 positive)."""
    path = _gensim_test_data() / POLARITY_FILE
    if not path.is_file():
        raise TiermemError(f"the polarity data set is missing at {path} (pip install --no-deps gensim==4.4.0)")
    examples = []
    # The original release is Windows-1252 (0x97 is an em dash, 0xe9 an é), not UTF-8.
    for line in path.read_text(encoding="cp1252").splitlines():
        tag, _, text = line.strip().partition(" ")
        if tag in ("__label__neg", "__label__pos") and text.strip():
            examples.append(Example(text.strip(), int(tag == "__label__pos")))
    return tuple(examples)


def polarity_split(k: int) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train with k per class, test with 50 per class); the test set does not depend on k."""
    rng = random.Random(DATA_SEED)
    train: list[Example] = []
    test: list[Example] = []
    for label in (0, 1):
        members = [e for e in polarity_sentences() if e.label == label]
        rng.shuffle(members)
        test += members[:TEST_PER_CLASS]
        pool = members[TEST_PER_CLASS:]
        if k > len(pool):
            raise TiermemError(f"k={k} per class exceeds the {len(pool)} training sentences per class")
        train += pool[:k]
    random.Random(DATA_SEED + 1).shuffle(train)  # interleave the classes
    return tuple(train), tuple(test)


def _polarity(k: int) -> Task:
    train, test = polarity_split(k)
    return Task(
        f"polarity-k{k}",
        "classify",
        train,
        test,
        f"Pang & Lee sentence polarity (Rotten Tomatoes), k={k} per class, 100 test, MeZO's SST-2 prompt",
        SST2_TEMPLATE,
        SST2_WORDS,
    )


def _wiki_lm() -> Task:
    from tiermem.bench.wikitext import wiki_articles

    articles = wiki_articles(_gensim_test_data())
    cut = int(len(articles) * 0.8)
    train = [Example(p) for _, paragraphs in articles[:cut] for p in paragraphs][:WIKI_TRAIN]
    test = [Example(p) for _, paragraphs in articles[cut:] for p in paragraphs][:WIKI_TEST]
    return Task(
        "wiki-lm",
        "lm",
        tuple(train),
        tuple(test),
        f"Wikipedia prose, {len(train)} paragraphs of the first 80% of articles, perplexity on {len(test)} held out",
    )


BUILTIN = {
    "polarity-k16": lambda: _polarity(16),
    "polarity-k50": lambda: _polarity(50),
    "wiki-lm": _wiki_lm,
}
DESCRIPTIONS = {
    "polarity-k16": "sentiment of movie-review sentences (Pang & Lee), MeZO's k=16 few-shot, accuracy",
    "polarity-k50": "the same, 50 per class (the larger setting), accuracy",
    "wiki-lm": "language modelling on held-out Wikipedia prose, perplexity",
}


def _file_task(path: Path) -> Task:
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise TiermemError(f"cannot read task file {path}: {exc}") from None
    words: tuple[str, ...] = ()
    if path.suffix == ".txt":
        examples = [Example(line.strip()) for line in lines]
        kind = "lm"
    else:
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                rows.append((str(row["text"]), " " + str(row["label"]).strip()))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TiermemError(f'{path}:{number}: expected {{"text": ..., "label": ...}}') from None
        words = tuple(sorted({label for _, label in rows}))
        if rows and len(words) < 2:
            raise TiermemError(f"task file {path} has one label ({words[0].strip()}): a classifier needs two or more")
        examples = [Example(text, words.index(label)) for text, label in rows]
        kind = "classify"
    if len(examples) < 2:
        raise TiermemError(f"task file {path} has {len(examples)} examples: it needs at least 2 (train and test)")
    cut = max(1, int(len(examples) * 0.8))
    template = "{text}" if kind == "lm" else "{text} It was"
    return Task(path.stem, kind, tuple(examples[:cut]), tuple(examples[cut:]), f"file {path}", template, words)


def load_task(name: str) -> Task:
    """A built-in task by name, or a ``.jsonl``/``.txt`` file; a one-line error for anything else or empty data."""
    if name in BUILTIN:
        task = BUILTIN[name]()
    elif (path := Path(name).expanduser()).suffix in (".jsonl", ".txt") and path.is_file():
        task = _file_task(path)
    else:
        raise TiermemError(f"unknown task '{name}': use one of {', '.join(BUILTIN)}, or a .jsonl or .txt file")
    if not task.train or not task.test:
        raise TiermemError(f"task '{name}' has no training or no test examples")
    return task
