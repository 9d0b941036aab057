"""--policy auto: the choice follows the prompt's length, the memory limit and the budget asked for, and says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiermem.cli import main
from tiermem.engine import GenerationConfig
from tiermem.errors import TiermemError
from tiermem.layer_info import describe_layers
from tiermem.memory import registry
from tiermem.memory.auto import COMPRESSION_AGNOSTIC, COMPRESSION_QUESTION_AWARE, LONG_CONTEXT, Auto
from tiermem.memory.base import BudgetedPolicy


def test_auto_choices(llama) -> None:  # type: ignore[no-untyped-def]
    infos = describe_layers(llama)  # 512 positions, 2 layers
    auto = registry.build("auto")
    assert isinstance(auto, Auto)
    fits = auto.choose(infos, 300, 400, GenerationConfig())
    assert fits.policy.name == "full" and "fit" in fits.reason
    past = auto.choose(infos, 600, 700, GenerationConfig())
    assert repr(past.policy) == repr(registry.build(LONG_CONTEXT)) and "512 positions" in past.reason
    bytes_per_token = sum(i.kv_bytes_per_token() for i in infos)
    tight = auto.choose(infos, 300, 400, GenerationConfig(kv_memory=bytes_per_token * 399))
    assert repr(tight.policy) == repr(registry.build(LONG_CONTEXT)) and "--kv-memory" in tight.reason
    roomy = auto.choose(infos, 300, 400, GenerationConfig(kv_memory=bytes_per_token * 400))
    assert roomy.policy.name == "full"


def test_auto_with_a_budget_compresses() -> None:
    infos: list = []
    agnostic = Auto(kv_budget=128).choose(infos, 1000, 1100, GenerationConfig())
    aware = Auto(compression_ratio=0.875).choose(infos, 1000, 1100, GenerationConfig(question_aware=True))
    assert repr(agnostic.policy) == repr(registry.build(COMPRESSION_AGNOSTIC, kv_budget=128))
    expected = registry.build(COMPRESSION_QUESTION_AWARE, compression_ratio=0.875, budget_includes_new=True)
    assert repr(aware.policy) == repr(expected)
    assert isinstance(aware.policy, BudgetedPolicy) and aware.policy.budget_for(1000) == 125
    assert "question-aware" in aware.reason
    with pytest.raises(TiermemError, match="not both"):
        Auto(kv_budget=1, compression_ratio=0.5)
    assert not registry.takes_budget("auto") and registry.budget_optional("auto")


def test_generate_defaults_to_auto_and_says_what_it_chose(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["generate", "--model", str(tiny_model_dir), "--context", "The pass key is 4321.", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert "full" in record["extra"]["auto"] and record["policy"].startswith("Full(")
    code = main(
        ["generate", "--model", str(tiny_model_dir), "--context", "The pass key is 4321.", "--max-new-tokens", "2"]
    )
    assert code == 0
    assert "[auto]" in capsys.readouterr().err
