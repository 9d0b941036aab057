"""The roofline cost model: time per token and peak memory of one configuration, from shapes and measured rates.

Each op's time is the larger of its arithmetic at the measured GEMM rate and its bytes at the measured streaming
rate (the roofline): a linear layer over T tokens does 2·T·params FLOPs on params·bytes of weights, so its
arithmetic intensity is about T FLOP/byte: decode (T = 1) is a GEMV bound by bandwidth, a prefill chunk
(T = 512) a GEMM bound by compute. Decode attention reads every hot KV byte once (intensity ≈ query heads per KV
head), so it is bandwidth-bound too. Each layer also pays a measured fixed overhead (Python and dispatch).

Weight streaming adds a load per layer per pass unless all layers fit (k = L); the loader thread overlaps loads
with compute, so a streamed layer costs ``max(compute, load)`` (the pipeline's steady state), the load at the read
loader's measured rate (one ``readinto`` from the page cache, or from disk when cold). The mmap loader's cost
(page-table population) depends on the page cache's folio sizes and is not modelled; the planner proposes the read
loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tiermem.plan.layer_profile import LayerProfile
from tiermem.plan.probe import Machine


@dataclass(frozen=True)
class Shapes:
    """What the cost model needs of a decoder-only model (read from its config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int
    dtype_bytes: int = 4

    @classmethod
    def from_config(cls, config: Any, dtype_bytes: int = 4) -> Shapes:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
            dtype_bytes=dtype_bytes,
        )

    @property
    def layer_params(self) -> int:
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def layer_bytes(self) -> int:
        return self.layer_params * self.dtype_bytes

    @property
    def resident_bytes(self) -> int:
        """Embeddings, final norm and head: what streaming keeps in RAM."""
        heads = 1 if self.tied else 2
        return (heads * self.vocab * self.hidden + self.hidden) * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.resident_bytes + self.layers * self.layer_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Config:
    """One way to run: weight placement with ``k`` layers held (stream), and the KV hot set per step."""

    weights: str  # "resident" or "stream"
    kv_policy: str  # a policy spec, for the command line
    hot_tokens: int  # KV tokens attention reads per step per layer
    kv_ram_bytes: int  # KV bytes held in RAM at the peak
    context: int
    chunk: int = 512
    k: int = 0  # stream: layers held in RAM
    warm_page_cache: bool = True  # stream: the layer files stay in the page cache between passes
    profile: LayerProfile | None = None  # a measured layer of this model under this policy (else pure roofline)


@dataclass
class Prediction:
    decode_s: float  # per generated token
    prefill_s: float  # the whole context
    peak_bytes: int
    parts: dict[str, float] = field(default_factory=dict)  # decode seconds per token by cause


def _roofline(flops: float, nbytes: float, machine: Machine) -> float:
    return max(flops / machine.gemm_flops, nbytes / machine.gemv_bytes)


def _attention_bytes(shapes: Shapes, tokens: int) -> int:
    return tokens * 2 * shapes.kv_heads * shapes.head_dim * shapes.dtype_bytes


def _streamed(shapes: Shapes, config: Config) -> bool:
    return config.weights == "stream" and config.k < shapes.layers


def _stream_floor(shapes: Shapes, config: Config, machine: Machine) -> float:
    """Least seconds a streamed layer takes: its load at the read loader's measured rate (page cache or disk)."""
    if not _streamed(shapes, config):
        return 0.0
    rate = machine.load_bytes if config.warm_page_cache else machine.disk_bytes
    return shapes.layer_bytes / rate


def decode_parts(shapes: Shapes, config: Config, machine: Machine) -> dict[str, float]:
    """Seconds per generated token, by cause."""
    attention_bytes = _attention_bytes(shapes, config.hot_tokens)
    attention = _roofline(4 * config.hot_tokens * shapes.heads * shapes.head_dim, attention_bytes, machine)
    profile = config.profile
    if profile is not None:  # measured layer; scale its attention to this run's hot set
        measured = _attention_bytes(shapes, profile.hot_tokens) / machine.gemv_bytes
        layer, fixed = max(profile.decode_s + attention - measured, 0.0), profile.forward_s
        parts = {"layers (measured)": shapes.layers * layer}
    else:
        weights = _roofline(2 * shapes.layer_params, shapes.layer_bytes, machine)
        layer, fixed = weights + attention + machine.layer_overhead_s, 0.0
        parts = {
            "weights": shapes.layers * weights,
            "attention": shapes.layers * attention,
            "overhead": shapes.layers * machine.layer_overhead_s,
        }
    stall = max(_stream_floor(shapes, config, machine) - layer, 0.0)  # the loader overlaps; only the excess shows
    head = _roofline(2 * shapes.vocab * shapes.hidden, shapes.vocab * shapes.hidden * shapes.dtype_bytes, machine)
    return parts | {"load stall": shapes.layers * stall, "head": head, "per forward": fixed}


def prefill_s(shapes: Shapes, config: Config, machine: Machine) -> float:
    """Seconds to prefill ``config.context`` tokens in chunks, each attending to at most ``hot + chunk`` tokens."""
    profile = config.profile
    load = _stream_floor(shapes, config, machine)
    if profile is not None:  # the measured chunk without its own attention, which is rescaled per chunk below
        typical = min(profile.context // 2, profile.hot_tokens) + profile.chunk
        measured = 4 * profile.chunk * typical * shapes.heads * shapes.head_dim / machine.gemm_flops
        rest = profile.chunk_s - measured
    total, done = 0.0, 0
    while done < config.context:
        chunk = min(config.chunk, config.context - done)
        attended = min(done, config.hot_tokens) + chunk
        attention = 4 * chunk * attended * shapes.heads * shapes.head_dim / machine.gemm_flops
        if profile is not None:
            compute = rest * chunk / profile.chunk + attention
        else:
            weights = _roofline(2 * chunk * shapes.layer_params, shapes.layer_bytes, machine)
            compute = weights + attention + machine.layer_overhead_s
        total += shapes.layers * max(compute, load) + (profile.forward_s if profile else 0.0)
        done += chunk
    return total


def peak_bytes(shapes: Shapes, config: Config, machine: Machine) -> int:
    """Process peak: the interpreter and libraries, weights held, KV held, one chunk's activations."""
    if config.weights == "stream":
        weights = shapes.resident_bytes + min(config.k, shapes.layers) * shapes.layer_bytes
    else:
        weights = shapes.weight_bytes
    attended = min(config.context, config.hot_tokens) + config.chunk
    activations = config.chunk * (3 * shapes.intermediate + 4 * shapes.hidden) * 4
    scores = config.chunk * attended * shapes.heads * 4  # SDPA's masked path materializes the scores
    return machine.base_rss + weights + config.kv_ram_bytes + activations + scores


def predict(shapes: Shapes, config: Config, machine: Machine) -> Prediction:
    parts = decode_parts(shapes, config, machine)
    return Prediction(
        sum(parts.values()), prefill_s(shapes, config, machine), peak_bytes(shapes, config, machine), parts
    )
