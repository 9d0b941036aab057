from __future__ import annotations

import pytest

from tiermem.errors import TiermemError
from tiermem.memory import REGISTRY, SnapKV, build, parse_spec
from tiermem.memory.registry import takes_budget


def test_every_policy_builds_and_its_repr_is_a_recipe() -> None:
    for name in REGISTRY:
        policy = build(name, kv_budget=256) if takes_budget(name) else build(name)
        rebuilt = eval(repr(policy), {cls.__name__: cls for cls in {e.cls for e in REGISTRY.values()}})
        assert rebuilt == policy


def test_variant_defaults_and_string_options() -> None:
    policy = build("snapkv-chunk", kv_budget="512", window_size="16")
    assert isinstance(policy, SnapKV)
    assert (policy.kv_budget, policy.window_size, policy.selection, policy.pooling) == (512, 16, "chunk", "maxpool")


def test_parse_spec() -> None:
    assert parse_spec("snapkv:window_size=64,kernel_size=7") == ("snapkv", {"window_size": "64", "kernel_size": "7"})
    with pytest.raises(TiermemError):
        parse_spec("snapkv:window_size")
    with pytest.raises(TiermemError):
        parse_spec("missing")
