"""``--weights flash``: "LLM in a flash" (Alizadeh et al., arXiv 2312.11514) for gated FFNs (SwiGLU, GeGLU).

Attention, embeddings, norms and each FFN's gate projection stay in RAM; each FFN's up-projection rows and
down-projection columns live on disk, **bundled**: neuron i is one record ``[W_up[i, :], W_down[:, i]]`` of
``2 * hidden`` values, so one read fetches both (row-column bundling). While decoding, the gate projection
predicts the active neurons (the ``density`` fraction with the largest ``|act(gate(x))|``), and a per-layer
**window** keeps every neuron active in the last ``window`` tokens in RAM, so a token reads only the neurons that
became active (windowing). The RAM copy is the paper's preallocated matrix: deletion moves the last rows into the
holes, appends go at the end, nothing is reallocated.

Departures from the paper, and why:
- The predictor is the gate projection itself, not a trained low-rank predictor: SmolLM2 and Gemma3 use SiLU/GELU
  gates, not ReLU, so there is no exact zero to predict, and training a predictor per layer (4 GPU-hours each in
  the paper) is out of reach here. The gate is exact about the activation and costs a third of the FFN in RAM.
  A neuron with a small ``|act(gate)|`` is *dropped*, so this is an approximation whose quality cost is measured
  (perplexity, needle accuracy) in BENCHMARKS.md; ``density=1.0`` is exact.
- A prompt (more than one token per forward) uses every neuron: the layer's whole bundle file is read in one
  sequential read and the FFN is computed exactly; the window starts at decoding.
- Reads are ``preadv`` of runs of consecutive neuron ids, one syscall per run; the paper uses 32 reader threads
  on a Mac's flash, where small reads need parallelism to reach the bandwidth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tiermem.errors import TiermemError
from tiermem.staging import staged_file
from tiermem.weights.stream import decoder_layers


@dataclass
class FlashConfig:
    """``density``: fraction of FFN neurons predicted active per decoded token; ``window``: tokens whose active
    neurons stay in RAM (the paper uses 2 for Llama-2, 4 for OPT/Falcon)."""

    density: float = 0.5
    window: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise TiermemError(f"flash density must be in (0, 1], got {self.density}")
        if self.window < 1:
            raise TiermemError(f"flash window must be at least 1 token, got {self.window}")


@dataclass
class FlashCounters:
    """What the FFNs read from disk: bytes and reads while decoding (one token per forward) and while prefilling."""

    decode_bytes: int = 0
    decode_reads: int = 0
    decode_tokens: int = 0  # forwards of one token, counted once per model step (layer 0)
    prefill_bytes: int = 0


def write_bundles(mlp: nn.Module, path: Path) -> None:
    """Write one layer's bundles: (intermediate, 2 * hidden) rows ``[up_i | down_i]`` in the weights' dtype."""
    up = mlp.get_parameter("up_proj.weight").detach()  # (I, d)
    down = mlp.get_parameter("down_proj.weight").detach()  # (d, I)
    bundles = torch.cat([up, down.t()], dim=1).contiguous()
    with staged_file(path) as partial:
        bundles.numpy().tofile(partial)


class NeuronWindow:
    """The RAM copy of the bundles of recently active neurons: rows ``[0, used)`` of a preallocated matrix."""

    def __init__(self, intermediate: int, row_values: int, capacity: int, dtype: torch.dtype):
        self.rows = torch.empty(capacity, row_values, dtype=dtype)
        self.neuron_at = torch.full((capacity,), -1, dtype=torch.long)  # row -> neuron id
        self.row_of = torch.full((intermediate,), -1, dtype=torch.long)  # neuron id -> row, -1 if not in RAM
        self.last_active = torch.full((intermediate,), -(2**40), dtype=torch.long)  # step each neuron was last used
        self.used = 0

    def evict_older_than(self, step: int) -> None:
        """Delete neurons not active since ``step``: the last rows move into the holes (no reallocation)."""
        n = self.used
        held = self.neuron_at[:n]
        stale = self.last_active[held] < step
        m = int(stale.sum())
        if m == 0:
            return
        tail = torch.arange(n - m, n)
        movers = tail[~stale[n - m :]]  # live rows past the new end
        holes = torch.nonzero(stale[: n - m]).flatten()  # stale rows before it (as many as movers)
        self.row_of[held[stale]] = -1
        self.rows[holes] = self.rows[movers]
        self.neuron_at[holes] = self.neuron_at[movers]
        self.row_of[self.neuron_at[holes]] = holes
        self.neuron_at[n - m : n] = -1
        self.used = n - m

    def append(self, neurons: torch.Tensor) -> torch.Tensor:
        """Reserve rows for ``neurons`` (sorted ids not in RAM) at the end; return the rows' slice view."""
        start, end = self.used, self.used + neurons.numel()
        if end > self.rows.shape[0]:
            raise RuntimeError("flash window overflow")  # cannot happen: capacity = window * active per token
        self.neuron_at[start:end] = neurons
        self.row_of[neurons] = torch.arange(start, end)
        self.used = end
        return self.rows[start:end]


class FlashMLP(nn.Module):
    """A gated FFN whose up and down projections are read from ``path`` on demand (see the module docstring)."""

    def __init__(self, mlp: nn.Module, path: Path, config: FlashConfig, counters: FlashCounters, first: bool):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            if getattr(getattr(mlp, name, None), "bias", 0) is not None:
                raise TiermemError("flash weights need a gated FFN without biases (gate_proj, up_proj, down_proj)")
        self.gate_proj: nn.Module = mlp.get_submodule("gate_proj")
        self.act_fn: nn.Module = mlp.get_submodule("act_fn")
        up = mlp.get_parameter("up_proj.weight")
        self.intermediate, self.hidden = int(up.shape[0]), int(up.shape[1])
        self.dtype: torch.dtype = up.dtype
        self.path, self.config, self.counters, self.first = path, config, counters, first
        self.active_per_token = max(1, round(config.density * self.intermediate))
        self.row_bytes: int = 2 * self.hidden * self.dtype.itemsize
        capacity = min(self.intermediate, config.window * self.active_per_token)
        self.window = NeuronWindow(self.intermediate, 2 * self.hidden, capacity, self.dtype)
        self.step = 0
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def _read(self, neurons: torch.Tensor, into: torch.Tensor) -> tuple[int, int]:
        """Read the bundles of sorted ``neurons`` into ``into`` (rows), one ``preadv`` per run of consecutive ids."""
        ids = neurons.tolist()
        reads, start = 0, 0
        raw = into.view(torch.uint8).numpy()
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                view = memoryview(raw[start:i]).cast("B")  # type: ignore[arg-type]
                got = os.preadv(self.fd, [view], ids[start] * self.row_bytes)
                if got != view.nbytes:
                    raise TiermemError(f"flash bundle file {self.path} is truncated")
                reads, start = reads + 1, i
        return len(ids) * self.row_bytes, reads

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every neuron (a prompt): one sequential read of the whole bundle file, then the exact FFN."""
        bundles = torch.empty(self.intermediate, 2 * self.hidden, dtype=self.dtype)
        nbytes, _ = self._read(torch.arange(self.intermediate), bundles)
        self.counters.prefill_bytes += nbytes
        up, down = bundles[:, : self.hidden], bundles[:, self.hidden :]
        return (self.act_fn(self.gate_proj(x)) * (x @ up.t())) @ down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, tokens, hidden) -> (batch, tokens, hidden)."""
        if x.shape[0] * x.shape[1] != 1:
            return self._dense(x)
        self.step += 1
        if self.first:
            self.counters.decode_tokens += 1
        act = self.act_fn(self.gate_proj(x))[0, 0]  # (I,)
        active = act.abs().topk(self.active_per_token).indices.sort().values
        window = self.window
        window.last_active[active] = self.step
        window.evict_older_than(self.step - self.config.window + 1)
        missing = active[window.row_of[active] < 0]
        if missing.numel():
            nbytes, reads = self._read(missing, window.append(missing))
            self.counters.decode_bytes += nbytes
            self.counters.decode_reads += reads
        rows = window.rows[window.row_of[active]]  # (active, 2 * hidden)
        up, down = rows[:, : self.hidden], rows[:, self.hidden :]
        hidden = act[active] * (x[0, 0] @ up.t())  # (active,)
        return (hidden @ down).reshape(x.shape)


class FlashWeights:
    """Replaces every decoder layer's FFN with a :class:`FlashMLP` over bundle files in ``folder``."""

    def __init__(self, model: nn.Module, folder: Path, config: FlashConfig):
        self.config, self.counters = config, FlashCounters()
        self.mlps: list[FlashMLP] = []
        folder.mkdir(parents=True, exist_ok=True)
        for index, layer in enumerate(decoder_layers(model)):
            path = folder / f"bundles_{index:04d}.bin"
            mlp = layer.get_submodule("mlp")
            up = mlp.get_parameter("up_proj.weight")
            expected = up.numel() * 2 * up.element_size()
            if not path.is_file() or path.stat().st_size != expected:
                write_bundles(mlp, path)
            flash = FlashMLP(mlp, path, config, self.counters, first=index == 0)
            layer.mlp = flash  # the old module, with its up and down projections, is freed
            self.mlps.append(flash)

    @property
    def ffn_bytes_per_token_resident(self) -> int:
        """What a resident FFN reads from RAM per token: gate, up and down of every layer."""
        return sum(3 * m.intermediate * m.hidden * m.dtype.itemsize for m in self.mlps)

    def stats(self) -> dict[str, float | int | str]:
        c = self.counters
        tokens = max(c.decode_tokens, 1)
        return {
            "weights": "flash",
            "flash_density": self.config.density,
            "flash_window": self.config.window,
            "ffn_bytes_read_per_token": c.decode_bytes // tokens,
            "ffn_reads_per_token": c.decode_reads // tokens,
            "ffn_bytes_per_token_resident": self.ffn_bytes_per_token_resident,
            "ffn_prefill_bytes": c.prefill_bytes,
        }

    def reset_counters(self) -> None:
        self.counters.decode_bytes = self.counters.decode_reads = 0
        self.counters.decode_tokens = self.counters.prefill_bytes = 0

    def close(self) -> None:
        for mlp in self.mlps:
            mlp.close()
