"""KV-cache policies, one per module, each a dataclass whose fields are its hyperparameters."""

from tiermem.memory.base import BudgetedPolicy, Policy
from tiermem.memory.emllm import EMLLM
from tiermem.memory.full import Full
from tiermem.memory.infllm import InfLLM
from tiermem.memory.layer import DenseLayer, SlidingWindowLayer, TierLayer
from tiermem.memory.registry import REGISTRY, build, names, parse_spec
from tiermem.memory.sentencekv import SentenceKV
from tiermem.memory.snapkv import SnapKV
from tiermem.memory.streaming import StreamingLLM

__all__ = [
    "EMLLM",
    "REGISTRY",
    "BudgetedPolicy",
    "DenseLayer",
    "Full",
    "InfLLM",
    "Policy",
    "SentenceKV",
    "SlidingWindowLayer",
    "SnapKV",
    "StreamingLLM",
    "TierLayer",
    "build",
    "names",
    "parse_spec",
]
