"""The dev split of ``benchmarks/tune_probe.py``: the polarity sentences that neither k=16's train nor test use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tiermem.tune.tasks import polarity_split

ROOT = Path(__file__).resolve().parents[1]


def _probe():
    spec = importlib.util.spec_from_file_location("tune_probe", ROOT / "benchmarks" / "tune_probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dev_split_is_disjoint_balanced_and_complete():
    try:
        train, test = polarity_split(16)
    except Exception as exc:  # the gensim wheel's data file is an optional install
        pytest.skip(f"polarity data unavailable: {exc}")
    dev = _probe().dev_split(16)
    texts = {e.text for e in dev}
    assert len(dev) == 68 and len(texts) == 68
    assert not texts & {e.text for e in train}
    assert not texts & {e.text for e in test}
    assert sum(e.label for e in dev) == 34  # 34 per class: the 50 - 16 pool sentences k=16 leaves unused
    # train, test and dev together are the whole 200-sentence file (minus nothing)
    assert len(texts | {e.text for e in train} | {e.text for e in test}) == 200


def test_dev_split_shrinks_as_k_grows():
    try:
        polarity_split(16)
    except Exception as exc:
        pytest.skip(f"polarity data unavailable: {exc}")
    probe = _probe()
    assert len(probe.dev_split(40)) == 20
    assert probe.dev_split(50) == ()
