"""The RULER-style suite: deterministic samples over real prose, answers placed exactly as often as the task says,
lengths on target, RULER's scoring, and a resume key that covers the whole configuration."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tiermem.bench.haystack import haystack_sentences, pool_documents, shuffled_passes
from tiermem.bench.report import write_report
from tiermem.bench.ruler import RULER_TASKS, TEMPLATE_TOKENS, make_ruler_sample, prompt_text
from tiermem.bench.ruler_common import Draft
from tiermem.bench.ruler_words import FWE_HEAD, cwe_frequencies
from tiermem.bench.runner import RESULTS_FILE, BenchConfig, load_rows, run_bench
from tiermem.bench.tasks import Sample, string_match_all, string_match_part
from tiermem.bench.wikitext import clean_wikitext
from tiermem.engine import GenerationConfig
from tiermem.errors import TiermemError
from tiermem.kvstore.blocks import StoreConfig
from tiermem.models import resolve_source

NEEDLE_TASKS = [t for t in RULER_TASKS if t.startswith("niah_")] + ["qa"]
TINY_LENGTH = 3072


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_samples_are_deterministic_and_on_length(tokenizer, task: str) -> None:
    # The tiny tokenizer has 300 tokens (~4x SmolLM2's count for the same text): 3k of them is ~800 real tokens.
    a = make_ruler_sample(task, tokenizer, TINY_LENGTH, 0, seed=3)
    assert a == make_ruler_sample(task, tokenizer, TINY_LENGTH, 0, seed=3)
    assert a.context != make_ruler_sample(task, tokenizer, TINY_LENGTH, 1, seed=3).context
    assert a.context != make_ruler_sample(task, tokenizer, TINY_LENGTH, 0, seed=4).context
    assert a.depth is None and a.metric == RULER_TASKS[task].metric
    target = TINY_LENGTH - TEMPLATE_TOKENS
    assert within(task, 0.97) * target <= prompt_tokens(tokenizer, a) <= target


def within(task: str, fraction: float) -> float:
    """How close the fit must land: qa adds whole documents (~5% of 3k tokens each), the others single words."""
    return fraction - 0.07 if task == "qa" else fraction


def prompt_tokens(tokenizer, sample: Sample) -> int:
    draft = Draft(sample.context, sample.question, sample.answer_prefix, sample.answers)
    return len(tokenizer(prompt_text(draft), add_special_tokens=False).input_ids)


@pytest.mark.slow
def test_lengths_land_within_two_percent_with_a_real_tokenizer() -> None:
    smollm2 = AutoTokenizer.from_pretrained(str(resolve_source("smollm2")))
    for length in (4096, 16384):
        target = length - TEMPLATE_TOKENS
        for task in RULER_TASKS:
            tokens = prompt_tokens(smollm2, make_ruler_sample(task, smollm2, length, 0))
            assert within(task, 0.98) * target <= tokens <= target, (task, length, tokens)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needle_answers_appear_exactly_once(tokenizer, task: str) -> None:
    for index in range(3):
        sample = make_ruler_sample(task, tokenizer, TINY_LENGTH, index)
        for answer in sample.answers:
            assert sample.context.lower().count(answer.lower()) == 1, (task, answer)
        assert all(answer.lower() not in sample.question.lower() for answer in sample.answers)


def test_needle_counts_follow_ruler(tokenizer) -> None:
    single = make_ruler_sample("niah_number", tokenizer, 2048, 0)
    assert single.context.count("One of the special magic numbers for") == 1
    assert single.question.startswith("What is the special magic number for")  # RULER's singular rewrite
    assert re.fullmatch(r"\d{7}", single.answers[0])
    uuid = make_ruler_sample("niah_uuid", tokenizer, 2048, 0).answers[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid)
    multikey = make_ruler_sample("niah_multikey", tokenizer, 2048, 0)
    assert multikey.context.count("One of the special magic numbers for") == 4 and len(multikey.answers) == 1
    multivalue = make_ruler_sample("niah_multivalue", tokenizer, 2048, 0)
    assert len(multivalue.answers) == 4 and multivalue.question.startswith("What are all the special magic numbers")
    multiquery = make_ruler_sample("niah_multiquery", tokenizer, 2048, 0)
    assert len(multiquery.answers) == 4 and multiquery.question.count(", ") == 3  # "a, b, c, and d"


def test_variable_tracking_chain(tokenizer) -> None:
    sample = make_ruler_sample("vt", tokenizer, TINY_LENGTH, 0)
    value = re.search(r"value (\d{5})", sample.question)
    assert value is not None and sample.context.count(value.group(1)) == 1
    names = sample.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert f"VAR {names[0]} = {value.group(1)}." in sample.context
    for before, after in itertools.pairwise(names):
        assert f"VAR {after} = VAR {before}." in sample.context
    assert [sample.context.lower().count(n.lower()) for n in names] == [2, 2, 2, 2, 1]
    assert sample.context.count("Memorize and track") == 2  # the solved example, then the task


def test_common_words_are_the_most_common(tokenizer) -> None:
    for length in (TINY_LENGTH, 8192):  # RULER's frequencies switch at 4096
        sample = make_ruler_sample("cwe", tokenizer, length, 0)
        task_list = sample.context.rsplit("Memorize the ones that appear most often.\n", 1)[1]
        counts = Counter(re.findall(r"\d+\. (\w+)", task_list))
        common = cwe_frequencies(length)[1][0]
        assert {w: counts[w] for w in sample.answers} == dict.fromkeys(sample.answers, common)
        assert max(c for w, c in counts.items() if w not in sample.answers) == cwe_frequencies(length)[1][1]
        assert all(sample.context.lower().count(w) == common for w in sample.answers)  # nowhere else, not in a word


def test_frequent_words_are_the_three_most_frequent(tokenizer) -> None:
    sample = make_ruler_sample("fwe", tokenizer, 4096, 0)
    counts = Counter(sample.context.removeprefix(FWE_HEAD).split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert counts.most_common(1)[0][0] == "..."
    assert tuple(ranked[:3]) == sample.answers
    assert counts[ranked[2]] > counts[ranked[3]]


def test_qa_is_documents_with_one_answering_sentence(tokenizer) -> None:
    sample = make_ruler_sample("qa", tokenizer, 4096, 0)
    assert sample.metric == "part" and sample.context.count("Document 1:\n") == 1
    assert sample.context.count("\n\nDocument ") >= 5


def test_haystack_walks_every_document_once_per_pass() -> None:
    passes = shuffled_passes(50, "seed")
    first, second = [next(passes) for _ in range(50)], [next(passes) for _ in range(50)]
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    documents = pool_documents()
    assert len(documents) > 300  # the Lee articles and the Wikipedia articles
    assert sum(map(len, documents)) > 15_000  # sentences: a 128k haystack without repeating any
    short, long = haystack_sentences("a", 400), haystack_sentences("a", 800)
    assert sum(len(s.split(" ")) for s in short) == 400 and short[:-1] == long[: len(short) - 1]


def test_wikitext_markup_is_removed() -> None:
    text = (
        "{{Infobox|name=x|{{nested}}}}\n"
        "'''Albedo''' is the [[reflection|reflectivity]] of a [[surface]]<ref>{{cite web|url=x}}</ref>, "
        "measured on a scale from zero for a black body to one for a white one, as [http://example.org the survey] "
        "noted in a long paragraph of plain prose, which is long enough to be kept.<!-- hidden -->\n"
        "== Heading ==\n"
        "* a list item that is long enough to pass the length filter of the cleaner but is still a list item and "
        "must go, so it is written out at some length here to be sure it is not dropped for being short\n"
    )
    assert clean_wikitext(text) == [
        "Albedo is the reflectivity of a surface, measured on a scale from zero for a black body to one for a white "
        "one, as the survey noted in a long paragraph of plain prose, which is long enough to be kept."
    ]


def test_ruler_scoring() -> None:
    assert string_match_all("A and b", ("a", "B", "c")) == pytest.approx(2 / 3)
    assert string_match_part("It was Oakenshaw.", ("Gideon Oakenshaw", "Oakenshaw")) == 1.0
    assert string_match_part("Gideon", ("Gideon Oakenshaw", "Oakenshaw")) == 0.0
    sample = Sample("qa", 1024, None, 0, "c", "q", "", ("Oakenshaw", "x"), metric="part")
    assert sample.score("oakenshaw") == 1.0
    assert Sample("cwe", 1024, None, 0, "c", "q", "", ("a", "b")).score("A") == 0.5


def test_bad_suite_arguments(tokenizer) -> None:
    with pytest.raises(TiermemError, match="unknown suite task"):
        make_ruler_sample("passkey", tokenizer, 2048, 0)
    with pytest.raises(TiermemError, match="too short"):
        make_ruler_sample("vt", tokenizer, 512, 0)
    with pytest.raises(TiermemError, match="at least 1024"):
        run_bench(BenchConfig(models=["unused"], tasks=["cwe"], lengths=[512]), Path("/nonexistent"))


def _config(model_dir: Path, **generation: object) -> BenchConfig:
    return BenchConfig(
        models=[str(model_dir)],
        policies=["full"],
        lengths=[200],
        depths=[0.5],
        tasks=["passkey"],
        generation=GenerationConfig(**{"max_new_tokens": 2, "chunk_size": 64, **generation}),  # type: ignore[arg-type]
        task_new_tokens=False,
    )


def test_resume_key_covers_the_configuration(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"

    def measured(config: BenchConfig) -> int:
        """How many rows a run adds to results.jsonl."""
        before = len(load_rows(out))
        run_bench(config, out)
        return len(load_rows(out)) - before

    assert measured(_config(tiny_model_dir)) == 1
    assert measured(_config(tiny_model_dir)) == 0  # identical: reused
    assert measured(_config(tiny_model_dir, chunk_size=32)) == 1
    assert measured(_config(tiny_model_dir, max_new_tokens=3)) == 1
    assert measured(_config(tiny_model_dir, store=StoreConfig(allocator="paged"))) == 1
    assert measured(_config(tiny_model_dir, store=StoreConfig(backend="disk"))) == 1
    bf16 = _config(tiny_model_dir)
    bf16.dtype = "bfloat16"
    assert measured(bf16) == 1
    assert measured(_config(tiny_model_dir, store=StoreConfig(allocator="paged"))) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["generation"]["store"]["allocator"] == "paged" and saved["generation"]["chunk_size"] == 64
    assert len(load_rows(out)) == len((out / RESULTS_FILE).read_text().splitlines()) == 6


def test_suite_sweep_shares_prompts_and_reports_by_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = BenchConfig(
        models=[str(tiny_model_dir)],
        policies=["streaming", "snapkv:window_size=8"],  # the tiny model has 1024 positions: compress to fit
        budgets=[64],
        lengths=[1024],
        tasks=["niah_number", "qa"],
        generation=GenerationConfig(max_new_tokens=3, chunk_size=256, question_aware=True),
        task_new_tokens=False,
    )
    rows = run_bench(config, tmp_path)
    assert len(rows) == 2 * 2 and {r["status"] for r in rows} == {"ok"}
    assert all(r["depth"] is None and 0.0 <= r["score"] <= 1.0 for r in rows)
    assert {r["metric"] for r in rows} == {"all", "part"}
    for task in ("niah_number", "qa"):
        assert len({r["prompt_tokens"] for r in rows if r["task"] == task}) == 1  # one prompt for both policies
    write_report(rows, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| policy | length | niah_number | qa | mean |" in summary
    header = (tmp_path / "summary_by_task.csv").read_text().splitlines()[0]
    assert header.split(",")[-3:] == ["niah_number", "qa", "mean"]
