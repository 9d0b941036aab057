"""KV-cache policies, one per module, each a dataclass whose fields are its hyperparameters."""

from tiermem.memory.adakv import AdaKV, AdaKVExpectedAttention
from tiermem.memory.base import BudgetedPolicy, Policy
from tiermem.memory.emllm import EMLLM
from tiermem.memory.expected_attention import ExpectedAttention
from tiermem.memory.full import Full
from tiermem.memory.infllm import InfLLM
from tiermem.memory.knorm import Knorm
from tiermem.memory.layer import DenseLayer, SlidingWindowLayer, TierLayer
from tiermem.memory.observed_attention import ObservedAttention
from tiermem.memory.pyramidkv import PyramidKV
from tiermem.memory.registry import REGISTRY, build, names, parse_spec
from tiermem.memory.scorer import ScorerLayer, ScorerPolicy
from tiermem.memory.sentencekv import SentenceKV
from tiermem.memory.snapkv import SnapKV
from tiermem.memory.streaming import StreamingLLM
from tiermem.memory.tova import TOVA

__all__ = [
    "EMLLM",
    "REGISTRY",
    "TOVA",
    "AdaKV",
    "AdaKVExpectedAttention",
    "BudgetedPolicy",
    "DenseLayer",
    "ExpectedAttention",
    "Full",
    "InfLLM",
    "Knorm",
    "ObservedAttention",
    "Policy",
    "PyramidKV",
    "ScorerLayer",
    "ScorerPolicy",
    "SentenceKV",
    "SlidingWindowLayer",
    "SnapKV",
    "StreamingLLM",
    "TierLayer",
    "build",
    "names",
    "parse_spec",
]
