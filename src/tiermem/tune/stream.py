"""ZO2 on disk (``--weights stream``): MeZO with the decoder layers on disk, each read once per step and written back.

ZO2 (Wang et al., "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models with Limited GPU
Memory", COLM 2025; ``zo2/optimizer/mezo_sgd/zo2.py``) keeps the blocks on the CPU and uploads each to the GPU once
per step: the block is perturbed +ε, runs the first forward, is perturbed −2ε, runs the second, is restored, and
goes back. The +ε and −ε activations travel together (``module_dual_forward``), and the previous step's update is
applied to a block when it is next uploaded ("delayed update fusion"), because g is known only after the last block.
Here the slow tier is the disk and the fast one is RAM:

- the model is built on ``meta``; the resident group (embeddings, final norm, head) is read into RAM once and every
  decoder layer lives in its own safetensors file (:mod:`tiermem.weights.shards`' layout), in ``<out>/weights-<k>``;
- one forward pass runs the batch twice over (rows ``[:B]`` are the +ε pass, ``[B:]`` the −ε pass); each layer's
  ``forward`` is replaced by the dual forward: take the layer (read ahead by a loader thread), apply the pending
  update of the previous step (seed, g), perturb +ε, run rows ``[:B]``, perturb −2ε, run ``[B:]``, perturb +ε,
  then hand the layer to a writer thread that saves it (temporary file, fsync, rename) into the other generation
  folder. So each layer is read once and written once per step, and at most three layers are in RAM (the next
  being read, the current, the previous being written), or one without overlap when ``--weight-memory`` is tight
  (an earlier version held the resident group twice, +ε and a −ε copy: 384 MiB more on the 1.1B checkpoint, which
  left room for one layer only under ``--weight-memory 1GB`` in float32);
- the resident group stays in RAM, once: each of its modules runs rows ``[:B]`` on the +ε values, is perturbed −2ε
  in place, runs rows ``[B:]`` and is restored (+ε) in place, the resident run's operations in its order. The input
  embedding is the exception, because a tied head still needs its +ε values at the end of the pass: its rows
  ``[B:]`` look up only the batch's token rows at −ε, computed from the +ε rows and the z rows kept while the
  step's +ε perturbation went by (a few rows, not a −ε copy of the matrix);
- generations alternate between two folders (:mod:`tiermem.tune.generations`) and the checkpoint (written after
  every step, a small JSON) names the folder and the pending (seed, g, lr); a crash mid-step leaves the previous
  folder and checkpoint whole. The lr travels with (seed, g) because a schedule (``--lr-schedule``) changes it
  before the delayed update is applied.

Each tensor goes through the same operations in the same order as in the resident run (restore, update, perturb),
and each row of the doubled batch through the same kernels, so the losses are those of the resident ZO run for the
same seed (tested bitwise on a tiny model). Departures from ZO2: the slow tier is disk, not CPU memory; no AMP or
bucketed transfers; only the stateless rules (``zo-sgd``, ``zo-sgd-sign``) stream, because momentum and Adam buffers
(one or two model-sized tensors) would have to stream too, which is not built.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tiermem.errors import TiermemError
from tiermem.tune.checkpoint import read_meta, write_atomic
from tiermem.tune.config import TuneConfig
from tiermem.tune.dual_batch import add_noise_keeping_rows, join, split_call
from tiermem.tune.generations import FIRST, export_sharded, layer_path, other, verify
from tiermem.tune.layer_files import load_resident, numel, read_aligned, write_layer
from tiermem.tune.objective import Batch, Objective
from tiermem.tune.perturb import add_noise_, step_seed
from tiermem.tune.zo import ZOOptimizer
from tiermem.weights.shards import MANIFEST, LayerStore, convert, open_store, read_group
from tiermem.weights.stream import _set_parameter, _tied_aliases, decoder_layers

MIB = 2**20
STREAM_RULES = ("zo-sgd", "zo-sgd-sign")


class StreamRunner:
    """A ZO runner whose decoder layers stay on disk; see the module docstring."""

    def __init__(self, config: TuneConfig, objective: Objective, model: nn.Module, store: LayerStore, root: Path):
        self.config, self.objective, self.model, self.root = config, objective, model, root
        self.zo = ZOOptimizer(config.zo_rule, config.hyper(), noise=config.noise())
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.folder = store.folder  # the generation holding the current weights
        self.layer_bytes = store.max_layer_bytes
        self.pending: tuple[int, float, float] | None = None  # (seed, g, lr) of the step not yet applied
        self.mode = "eval"
        self.seed = 0
        self._placeholders = [dict(layer.named_parameters()) for layer in self.layers]
        self.held = self._layers_held(store)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="tune-read") if self.held > 1 else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tune-write") if self.held > 1 else None
        self._reads: dict[int, Future[dict[str, torch.Tensor]]] = {}
        self._writes: list[tuple[int, Future[str]]] = []
        self.checksums: dict[int, str] = {}  # layer -> SHA-256 of its file in the current generation
        self._resident_named = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.layers.")]
        self._names = {id(p): n for n, p in self._resident_named}
        embedding = model.get_input_embeddings()  # type: ignore[operator]
        self._embedding = embedding if isinstance(embedding, nn.Embedding) else None
        self._lookup: tuple[torch.Tensor, torch.Tensor] | None = None  # the batch's token ids, their −ε rows
        self._restored: set[int] = set()  # id of each resident parameter already back at θ in this step
        shards = (store.resident, *store.layers)
        self.trained_parameters = sum(numel(e.shape) for shard in shards for e in shard.tensors)
        for index, layer in enumerate(self.layers):
            layer.forward = self._dual_layer(index, layer.forward)
        users: dict[int, int] = {}
        for module in self._resident_modules():
            module.forward = self._dual_resident(module, module.forward)
            for p in module.parameters(recurse=False) if module is not self._embedding else ():
                users[id(p)] = users.get(id(p), 0) + 1
        if any(count > 1 for count in users.values()):  # the in-place −ε of a second user would see θ, not +ε
            raise TiermemError("--weights stream: a weight shared by two modules besides the embedding")

    # --- setup -------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, config: TuneConfig, objective_factory: Callable[[Any], Objective]) -> StreamRunner:
        from tiermem.models import DTYPES, SUPPORTED_MODEL_TYPES, resolve_source

        if config.zo_rule not in STREAM_RULES:
            raise TiermemError(
                f"--weights stream supports {', '.join(STREAM_RULES)} (momentum/Adam state not streamed)"
            )
        source = resolve_source(config.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
            hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TiermemError(f"cannot load model from {source}: {type(exc).__name__}: {exc}") from None
        if getattr(hf_config, "model_type", "?") not in SUPPORTED_MODEL_TYPES:
            raise TiermemError(f"model type '{hf_config.model_type}' is not supported for streaming")
        objective = objective_factory(tokenizer)
        dtype = DTYPES[config.dtype]
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model.tie_weights()
        root = config.out if config.out is not None else Path(tempfile.mkdtemp(prefix="tiermem-tune-"))
        first = root / FIRST
        if not config.resume:
            for old in root.glob("weights-*"):
                shutil.rmtree(old)
            convert(source, first, dtype, tied=set(_tied_aliases(model)))
        current = first
        if config.resume:  # the checkpoint's generation: the other may hold a crashed step's files, torn ones too
            current = root / str((read_meta(root).get("stream") or {}).get("folder", FIRST))
        store = open_store(current, {name for name, _ in model.named_parameters()})
        load_resident(model, store)
        model.eval()
        model.requires_grad_(False)
        return cls(config, objective, model, store, root)

    def _layers_held(self, store: LayerStore) -> int:
        """3 layers in RAM (read ahead, compute, write behind) if ``--weight-memory`` allows, else 1; else an error.

        The resident group counts once (its −ε lives in place); the batch's −ε embedding rows are left out (a few
        hundred rows).
        """
        limit = self.config.weight_memory
        base = store.resident_bytes
        if limit is None or limit >= base + 3 * self.layer_bytes:
            return 3
        if limit >= base + self.layer_bytes:
            return 1
        raise TiermemError(
            f"--weight-memory {limit / MIB:.0f} MiB is below what one streamed ZO step holds: the resident tensors "
            f"({base / MIB:.0f} MiB) plus one layer ({self.layer_bytes / MIB:.0f} MiB): give at "
            f"least {(base + self.layer_bytes) / MIB:.0f} MiB"
        )

    def _resident_modules(self) -> list[nn.Module]:
        """Leaf modules outside the decoder layers that own parameters (embeddings, final norm, head)."""
        layer_ids = {id(m) for layer in self.layers for m in layer.modules()}
        return [
            m for m in self.model.modules() if id(m) not in layer_ids and any(True for _ in m.parameters(recurse=False))
        ]

    # --- layers in and out ---------------------------------------------------------------------------------------

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        tensors = read_aligned(layer_path(self.folder, index))
        if self.pending is not None:  # ZO2's delayed update: the previous step's rule, applied on arrival
            for name, tensor in tensors.items():
                self._apply_pending(name, tensor)
        return tensors

    def _apply_pending(self, name: str, tensor: torch.Tensor) -> None:
        """The previous step's update of one tensor, with that step's lr (the schedule may have moved on since)."""
        assert self.pending is not None
        seed, g, lr = self.pending
        rule = self.zo if self.zo.hyper.lr == lr else replace(self.zo, hyper=replace(self.zo.hyper, lr=lr))
        rule.update_tensor(name, tensor, seed, g)

    def _acquire(self, index: int) -> dict[str, torch.Tensor]:
        future = self._reads.pop(index, None)
        tensors = future.result() if future is not None else self._read(index)
        if self._reader is not None and index + 1 < self.num_layers:
            self._reads[index + 1] = self._reader.submit(self._read, index + 1)
        return tensors

    def _save(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        path = layer_path(other(self.folder), index)
        if self._writer is None:
            self.checksums[index] = write_layer(path, tensors)
            return
        if self._writes:  # at most one layer waits for the disk: the RAM bound counts three layers
            done, future = self._writes[-1]
            self.checksums[done] = future.result()
        self._writes.append((index, self._writer.submit(write_layer, path, tensors)))

    # --- the dual forward ----------------------------------------------------------------------------------------

    def _dual_layer(self, index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        layer = self.layers[index]
        prefix = f"model.layers.{index}."

        def dual(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            tensors = self._acquire(index)
            for name in self._placeholders[index]:
                _set_parameter(layer, name, nn.Parameter(tensors[prefix + name], requires_grad=False))
            try:
                if self.mode != "dual":
                    return forward(hidden, *args, **kwargs)
                rows = hidden.shape[0] // 2
                named = list(tensors.items())
                eps = self.zo.hyper.eps
                (args_plus, kw_plus), (args_minus, kw_minus) = split_call(args, kwargs, rows)
                for name, tensor in named:
                    add_noise_(tensor, self.seed, name, eps, self.zo.noise)
                out_plus = forward(hidden[:rows], *args_plus, **kw_plus)
                for name, tensor in named:
                    add_noise_(tensor, self.seed, name, -2 * eps, self.zo.noise)
                out_minus = forward(hidden[rows:], *args_minus, **kw_minus)
                for name, tensor in named:
                    add_noise_(tensor, self.seed, name, eps, self.zo.noise)
                self._save(index, tensors)
                return join(out_plus, out_minus)
            finally:
                for name, placeholder in self._placeholders[index].items():
                    _set_parameter(layer, name, placeholder)

        return dual

    def _dual_resident(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def dual(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.mode != "dual":
                return forward(x, *args, **kwargs)
            rows = x.shape[0] // 2
            out_plus = forward(x[:rows], *args, **kwargs)
            if module is self._embedding:
                out_minus = self._lookup_minus(module, forward, x[rows:], *args, **kwargs)
            else:  # θ+εz -> θ−εz, rows [B:], -> θ: the resident run's three operations on this tensor
                named = [(self._names[id(p)], p) for p in module.parameters(recurse=False)]
                for name, p in named:
                    add_noise_(p.data, self.seed, name, -2 * self.zo.hyper.eps, self.zo.noise)
                try:
                    out_minus = forward(x[rows:], *args, **kwargs)
                finally:
                    for name, p in named:
                        add_noise_(p.data, self.seed, name, self.zo.hyper.eps, self.zo.noise)
                        self._restored.add(id(p))
            return torch.cat([out_plus, out_minus])

        return dual

    def _lookup_minus(
        self, module: nn.Embedding, forward: Callable[..., Any], ids: torch.Tensor, *args: Any, **kw: Any
    ) -> Any:
        """The embedding of the −ε rows from the batch's −ε table rows: ``ids`` (B, T) renumbered into them."""
        assert self._lookup is not None
        wanted, rows = self._lookup
        weight, padding = module.weight, module.padding_idx
        saved = weight.data
        weight.data, module.padding_idx = rows, None  # padding_idx only shapes gradients; its index is gone here
        try:
            return forward(torch.searchsorted(wanted, ids), *args, **kw)
        finally:
            weight.data, module.padding_idx = saved, padding

    # --- the runner interface ------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        self._flush()
        self.mode = "eval"
        return self.objective.evaluate(self.model, self.config.eval_batch_size)

    @torch.inference_mode()
    def forward_only(self, batch: Batch) -> float:
        self._flush()
        self.mode = "eval"
        return float(self.objective.loss(self.model, batch))

    @torch.inference_mode()
    def train_step(self, step: int, batch: Batch) -> dict[str, Any]:
        seed = step_seed(self.config.seed, step)
        eps = self.zo.hyper.eps
        if self.pending is not None:  # the resident group is in RAM: its pending update is applied now
            self._update_resident()
        self._restored = set()
        for name, param in self._resident_named:
            if self._embedding is not None and param is self._embedding.weight:
                wanted = torch.unique(batch.input_ids)  # sorted
                z_rows = add_noise_keeping_rows(param.data, seed, name, eps, wanted, self.zo.noise)
                self._lookup = (wanted, param.data[wanted].add_(z_rows, alpha=-2 * eps))  # (θ+εz)−2εz, those rows
            else:
                add_noise_(param.data, seed, name, eps, self.zo.noise)
        self.mode, self.seed = "dual", seed
        other(self.folder).mkdir(exist_ok=True)
        doubled = Batch(
            *(torch.cat([t, t]) for t in (batch.input_ids, batch.attention_mask, batch.position_ids)), batch.labels
        )
        try:
            logits = self.objective.logits(self.model, doubled)
        finally:
            self.mode = "eval"
        rows = batch.input_ids.shape[0]
        plus = float(self.objective.loss_from_logits(logits[:rows], batch))
        minus_loss = float(self.objective.loss_from_logits(logits[rows:], batch))
        for name, param in self._resident_named:  # an untied embedding is still at +ε: the resident run's −2ε, +ε
            if id(param) not in self._restored:
                add_noise_(param.data, seed, name, -2 * eps, self.zo.noise)
                add_noise_(param.data, seed, name, eps, self.zo.noise)
        self._lookup = None
        self._finish_writes()
        g = self.zo.projected_grad(plus, minus_loss)
        self.zo.begin_update()
        self.pending = (seed, g, self.zo.hyper.lr)
        return {"loss": (plus + minus_loss) / 2, "loss_plus": plus, "loss_minus": minus_loss, "projected_grad": g}

    def _update_resident(self) -> None:
        for name, param in self._resident_named:
            self._apply_pending(name, param.data)

    def _finish_writes(self) -> None:
        for index, future in self._writes:
            self.checksums[index] = future.result()
        self._writes.clear()
        target = other(self.folder)
        # The resident group joins the generation as it stands (restored, its pending update not yet applied),
        # so every folder is a complete layer store; the manifest goes last, atomically (a resumed run opens it).
        resident = {n: p.data for n, p in self._resident_named}
        self.checksums[-1] = write_layer(target / "resident.safetensors", resident)
        write_atomic(target / MANIFEST, (self.folder / MANIFEST).read_bytes())
        self.folder = target

    def _flush(self) -> None:
        """Apply the pending update to every layer (one read and write each) so the folder holds the weights."""
        if self.pending is None:
            return
        target = other(self.folder)
        target.mkdir(exist_ok=True)
        for index in range(self.num_layers):
            self._save(index, self._acquire(index))
        self._update_resident()
        self._finish_writes()
        self.pending = None

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}  # everything is in the generation folder
        checksums = {str(k): v for k, v in self.checksums.items()}
        return tensors, {"stream": {"folder": self.folder.name, "pending": self.pending, "sha256": checksums}}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        stream = meta.get("stream") or {}
        folder = self.root / str(stream.get("folder", "weights-?"))
        self.checksums = verify(folder, stream.get("sha256") or {})  # before any compute: a one-line error
        store = open_store(folder, {n for n, _ in self.model.named_parameters()})
        resident = read_group(store.resident)
        with torch.no_grad():
            for name, param in self._resident_named:
                if name in resident:  # a tied head is the embedding's parameter, stored once
                    param.data.copy_(resident[name])
        self.folder = folder
        pending = stream.get("pending")
        # A checkpoint from before the lr travelled with (seed, g) ran a constant lr: the configured one.
        lr = float(pending[2]) if pending and len(pending) > 2 else self.zo.hyper.lr
        self.pending = (int(pending[0]), float(pending[1]), lr) if pending else None
        self.zo.updates = int(meta["step"])

    def save_model(self, out: Path) -> None:
        """A sharded HF folder: the layer files as shards plus an index (never the whole model in RAM)."""
        self._flush()
        export_sharded(self.folder, {n: p.data for n, p in self._resident_named}, self.num_layers, out / "model")
        self.model.config.save_pretrained(str(out / "model"))  # type: ignore[union-attr,operator]
        self.objective.tokenizer.save_pretrained(str(out / "model"))

    def close(self) -> None:
        for pool in (self._reader, self._writer):
            if pool is not None:
                pool.shutdown(wait=True)
        if self.config.out is None:
            shutil.rmtree(self.root, ignore_errors=True)
