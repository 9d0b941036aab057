"""``tiermem plan``: pick weight placement, KV policy and budgets for a memory limit and a context length.

Candidates: for each KV choice, resident weights if they fit, else streamed weights with as many layers held as
the rest of the limit allows. KV choices, in order of preference:
1. ``full`` — exact; only when the context plus the answer stays inside the model's trained positions and every
   token's KV fits in RAM beside the weights;
2. ``infllm-small`` with ``--kv-memory`` — block memory in RAM up to that limit, the rest on disk; reads past the
   trained window (measured in BENCHMARKS.md: passkeys at 16k-32k tokens with SmolLM2). Its hot set per step is
   64 initial + 256 local + 4 x 64 retrieved tokens.
SnapKV is not proposed: question-agnostic compression lost most needles in our measurements.
Among feasible candidates the exact one wins; otherwise the fastest predicted decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiermem.errors import TiermemError
from tiermem.plan.cost import Config, Prediction, Shapes, predict
from tiermem.plan.layer_profile import LayerProfile
from tiermem.plan.probe import Machine

MIB = 2**20
INFLLM_SMALL_HOT = 64 + 256 + 4 * 64


@dataclass
class Candidate:
    config: Config
    prediction: Prediction
    fits: bool
    exact: bool

    @property
    def label(self) -> str:
        held = f" (k={self.config.k})" if self.config.weights == "stream" else ""
        return f"{self.config.weights}{held} + {self.config.kv_policy}"


@dataclass(frozen=True)
class KVOption:
    policy: str  # the registered policy the layer profile runs
    spec: str  # the command-line form, with its --kv-memory
    hot_tokens: int
    kv_ram_bytes: int


def kv_options(shapes: Shapes, context: int, new_tokens: int, memory: int, chunk: int = 512) -> list[KVOption]:
    """Each KV choice that applies, with its hot set and the KV bytes it holds in RAM."""
    per_token = shapes.kv_bytes_per_token
    options = []
    if context + new_tokens <= shapes.max_positions:
        options.append(KVOption("full", "full", context + new_tokens, (context + new_tokens) * per_token))
    floor = 2 * (INFLLM_SMALL_HOT + chunk) * per_token  # hot set plus a working margin of blocks
    kv_memory = max(floor, min((context + new_tokens) * per_token, memory // 8))
    spec = f"infllm-small --kv-memory {kv_memory // MIB}MB"
    options.append(KVOption("infllm-small", spec, INFLLM_SMALL_HOT, kv_memory))
    return options


def candidates(
    shapes: Shapes,
    machine: Machine,
    memory: int,
    context: int,
    new_tokens: int,
    profiles: dict[str, LayerProfile] | None = None,
    chunk: int = 512,
    warm_page_cache: bool = True,
) -> list[Candidate]:
    """Resident and (if resident does not fit) streamed weights for each KV option; ``profiles`` maps a policy
    name to its measured layer (without one, the pure roofline is used); ``warm_page_cache=False`` assumes
    streamed layers come from disk."""
    out = []
    for option in kv_options(shapes, context, new_tokens, memory, chunk):
        policy, hot, kv_ram = option.spec, option.hot_tokens, option.kv_ram_bytes
        profile = (profiles or {}).get(option.policy)
        exact = option.policy == "full"
        resident = Config("resident", policy, hot, kv_ram, context, chunk, profile=profile)
        prediction = predict(shapes, resident, machine)
        out.append(Candidate(resident, prediction, prediction.peak_bytes <= memory, exact))
        if prediction.peak_bytes <= memory:
            continue
        streaming = dict(warm_page_cache=warm_page_cache, profile=profile)
        empty = Config("stream", policy, hot, kv_ram, context, chunk, k=0, **streaming)
        k = min(shapes.layers, int((memory - predict(shapes, empty, machine).peak_bytes) // shapes.layer_bytes))
        stream = Config("stream", policy, hot, kv_ram, context, chunk, k=max(k, 1), **streaming)
        streamed = predict(shapes, stream, machine)
        out.append(Candidate(stream, streamed, k >= 1 and streamed.peak_bytes <= memory, exact))
    return out


def choose(options: list[Candidate]) -> Candidate:
    feasible = [c for c in options if c.fits]
    if not feasible:
        least = min(options, key=lambda c: c.prediction.peak_bytes)
        raise TiermemError(
            f"no configuration fits: the smallest ({least.label}) needs {least.prediction.peak_bytes / MIB:.0f} MiB"
        )
    return min(feasible, key=lambda c: (not c.exact, c.prediction.decode_s))


def command(model: str, choice: Candidate, shapes: Shapes) -> str:
    cfg = choice.config
    parts = [f"tiermem generate --model {model}"]
    if cfg.weights == "stream":
        limit = shapes.resident_bytes + cfg.k * shapes.layer_bytes
        parts.append(f"--weights stream --weight-memory {-(-limit // MIB)}MB --weight-loader read")
    parts.append(f"--policy {cfg.kv_policy}")
    return " ".join(parts) + " --context-file FILE --question ..."


def explain(shapes: Shapes, machine: Machine, memory: int, context: int, choice: Candidate) -> list[str]:
    """Why this choice, in numbers."""
    lines = [
        f"machine: GEMM {machine.gemm_flops / 1e9:.0f} GFLOP/s, GEMV {machine.gemv_bytes / 1e9:.1f} GB/s, "
        f"page-cache load {machine.load_bytes / 1e9:.1f} GB/s, disk {machine.disk_bytes / 1e9:.2f} GB/s, "
        f"{machine.layer_overhead_s * 1e3:.2f} ms overhead per layer, {machine.base_rss / MIB:.0f} MiB base RSS",
        f"model: {shapes.weight_bytes / MIB:.0f} MiB of weights ({shapes.layers} layers of "
        f"{shapes.layer_bytes / MIB:.1f} MiB, {shapes.resident_bytes / MIB:.0f} MiB embeddings/head), "
        f"KV {shapes.kv_bytes_per_token / 1024:.1f} KiB per token, {shapes.max_positions} trained positions",
    ]
    if context > shapes.max_positions:
        lines.append(f"{context} tokens exceed the trained window: full attention is out; block memory reads past it")
    elif not choice.exact:
        lines.append("full attention does not fit beside the weights: block memory keeps the KV on disk")
    if choice.config.weights == "stream":
        lines.append(
            f"the weights do not fit in {memory / MIB:.0f} MiB: stream them, {choice.config.k} of "
            f"{shapes.layers} layers held; decode is bound by loads when a load outlasts a layer's compute"
        )
        lines.append(
            "predicted for the read loader (each layer copied into a slot at the probe's page-cache read rate); the "
            "default mmap loader is usually faster (1.27x measured) but its cost depends on the page cache's folio "
            "sizes, which the model does not predict"
        )
    else:
        lines.append("the weights fit: keep them resident (no load per token)")
    return lines
