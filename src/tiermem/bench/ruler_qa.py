"""RULER's question answering (``qa``) format over the prose pool, with a fact that only one sentence states.

RULER's ``qa_1``/``qa_2`` put a SQuAD or HotpotQA paragraph that answers the question among other paragraphs of the
same dataset, shuffled, each written ``Document {i}:``, under RULER's qa template, and score with
``string_match_part`` (any reference answer found in the output). Those datasets are downloaded by RULER and are not
shipped in any package tiermem installs, so tiermem keeps the format, the template and the metric and changes the
question: one sentence stating a made-up fact (who founded a society, where it moved, when it was founded, who leads
it) is inserted into one real passage, and the question asks for that fact. Names, organisations, towns and years
are drawn from seeded lists, and a draw whose answer the prose already contains is drawn again, so the inserted
sentence is the only one that answers. This is closer to a needle in natural language than to reading
comprehension: the answer is stated, not inferred.
"""

from __future__ import annotations

import random

from tiermem.bench.haystack import pool_passages, shuffled_passes, split_sentences
from tiermem.bench.ruler_common import Draft
from tiermem.bench.tasks import ADJECTIVES, NOUNS

INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
HEAD = INSTRUCTION + "\n\nThe following are given documents.\n\n"
DOCUMENT = "Document {i}:\n{document}"
TOKENS_TO_GENERATE = 32  # RULER's tokens_to_generate for qa

FIRST_NAMES = (
    "Adaeze", "Bronwen", "Casimir", "Dagny", "Evander", "Faustina", "Gideon", "Henrike", "Ignatius", "Jolanta",
    "Kasimir", "Leocadia", "Mordecai", "Nerys", "Octavian", "Perpetua", "Quillon", "Rosalind", "Severin", "Tamsin",
)  # fmt: skip
SURNAMES = (
    "Abernathy", "Brightwater", "Castellane", "Drummondsley", "Ellingboe", "Fairbrook", "Gallowglass", "Halloran",
    "Ingleby", "Jessamine", "Kettleburn", "Lindqvist", "Marchbank", "Nethercott", "Oakenshaw", "Pennyfeather",
    "Quarrington", "Ravensworth", "Stainforth", "Thistlewood",
)  # fmt: skip
KINDS = ("Society", "Guild", "Trust", "League", "Institute", "Foundation")
TOWN_STARTS = ("Ash", "Bram", "Cold", "Elder", "Fern", "Glen", "Hart", "Lark", "Mill", "Oak", "Red", "Thorn")
TOWN_ENDS = ("brook", "bury", "dale", "field", "haven", "holm", "mere", "moor", "stead", "wick", "worth", "combe")
ROLES = ("archivist", "treasurer", "surveyor", "engineer", "librarian", "physician")

# (fact sentence, question, which drawn fields are accepted answers)
FACTS = (
    ("{name} founded the {org} in {town} in {year}.", "Who founded the {org}?", ("name", "surname")),
    (
        "In {year} the {org} moved its headquarters to the town of {town}.",
        "To which town did the {org} move?",
        ("town",),
    ),
    ("The {org} was founded in {year} by a group of {role}s.", "In which year was the {org} founded?", ("year",)),
    (
        "{name} has served as chief {role} of the {org} since {year}.",
        "Who is the chief {role} of the {org}?",
        ("name", "surname"),
    ),
)


def _fields(rng: random.Random) -> dict[str, str]:
    first, surname = rng.choice(FIRST_NAMES), rng.choice(SURNAMES)
    return {
        "name": f"{first} {surname}",
        "surname": surname,
        "org": f"{rng.choice(ADJECTIVES).title()} {rng.choice(NOUNS).title()} {rng.choice(KINDS)}",
        "town": rng.choice(TOWN_STARTS) + rng.choice(TOWN_ENDS),
        "year": str(rng.randint(1720, 1899)),
        "role": rng.choice(ROLES),
    }


def build_qa(seed: str, documents: int) -> Draft:
    """The qa instance of ``seed`` with ``documents`` passages, one of them holding the fact (draws come first)."""
    rng = random.Random(seed)
    fact, question, answer_fields = rng.choice(FACTS)
    fields = _fields(rng)
    gold_depth, sentence_depth = rng.random(), rng.random()
    passages = pool_passages()
    stream = shuffled_passes(len(passages), f"{seed}/documents")
    chosen = [passages[next(stream)] for _ in range(max(documents, 1))]
    gold = list(split_sentences(chosen[0]))
    gold.insert(int(sentence_depth * (len(gold) + 1)), fact.format(**fields))
    chosen[0] = " ".join(gold)
    # RULER shuffles the documents; the gold one lands at a depth drawn before the count is known.
    gold_index = min(int(gold_depth * len(chosen)), len(chosen) - 1)
    chosen.insert(gold_index, chosen.pop(0))
    context = HEAD + "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
    answers = tuple(fields[f] for f in answer_fields)
    return Draft(
        context=context,
        question=INSTRUCTION + "\n\n" + question.format(**fields),
        answer_prefix="",
        answers=answers,
        occurrences=dict.fromkeys(answers, 1),
    )
