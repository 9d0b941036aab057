"""The resident trainer: the whole model in RAM, stepped by a ZO method or by backprop (AdamW, LoRA).

ZO steps run under ``torch.inference_mode``: no autograd graph, no gradient, activations freed layer by layer, so
memory is the model plus one forward pass (MeZO's claim). Backprop steps keep the graph (or recompute it per layer
with gradient checkpointing, Chen et al. 2016, through HF's ``gradient_checkpointing_enable``) and AdamW's two
moment buffers per trained parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiermem.models import LoadedModel
from tiermem.tune.checkpoint import optimizer_tensors, restore_optimizer
from tiermem.tune.config import TuneConfig
from tiermem.tune.lora import add_lora, save_lora
from tiermem.tune.objective import Batch, Objective
from tiermem.tune.perturb import step_seed
from tiermem.tune.zo import ZOOptimizer, trained


class ResidentRunner:
    """Owns the (possibly LoRA-wrapped) model and its optimizer; one :meth:`train_step` per step."""

    def __init__(self, lm: LoadedModel, config: TuneConfig, objective: Objective):
        self.lm, self.config, self.objective = lm, config, objective
        model: torch.nn.Module = lm.model
        if config.uses_lora:
            with torch.random.fork_rng():  # A's random init from the run's seed: a rerun starts identically
                torch.manual_seed(config.seed)
                model = add_lora(lm.model)  # freezes the base, adds trainable A and B (B = 0)
        else:
            model.requires_grad_(True)  # weights are private and aligned (layer_files.load_private)
        self.model = model
        self.named = trained(model.named_parameters())
        self.zo: ZOOptimizer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if config.zo:
            self.zo = ZOOptimizer(config.zo_rule, config.hyper(), noise=config.noise())
            model.requires_grad_(False)  # ZO never needs autograd; keep the LoRA/full selection in self.named
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=config.backprop_lr(), weight_decay=config.weight_decay)
            if config.gradient_checkpointing:
                lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if config.uses_lora:
                    lm.model.enable_input_require_grads()  # the checkpointed blocks need an input that has a grad

    @property
    def trained_parameters(self) -> int:
        return sum(p.numel() for _, p in self.named)

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        return self.objective.evaluate(self.model, self.config.eval_batch_size)

    @torch.inference_mode()
    def forward_only(self, batch: Batch) -> float:
        """One forward pass with the loss, nothing kept: what inference costs on this batch."""
        return float(self.objective.loss(self.model, batch))

    def train_step(self, step: int, batch: Batch) -> dict[str, Any]:
        if self.zo is not None:
            seed = step_seed(self.config.seed, step)
            with torch.inference_mode():
                probes = self.zo.step_queries(
                    self.named, seed, lambda: self.forward_only(batch), self.config.zo_queries
                )
            # The loss is the mean of the 2n probes; loss_plus/minus and projected_grad are direction 0's.
            losses = [value for plus, minus, _ in probes for value in (plus, minus)]
            plus, minus, g = probes[0]
            record = {"loss": sum(losses) / len(losses), "loss_plus": plus, "loss_minus": minus, "projected_grad": g}
            if len(probes) > 1:  # n-SPSA
                record["projected_grads"] = [g for _, _, g in probes]
            return record
        assert self.optimizer is not None
        self.model.train()
        loss = self.objective.loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach())}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON for a checkpoint: the trained parameters and the optimizer's state."""
        tensors = {f"param:{name}": p for name, p in self.named}
        extra: dict[str, Any] = {}
        if self.zo is not None:
            tensors.update({f"state:{k}": v for k, v in self.zo.state.items()})
            extra["zo_updates"] = self.zo.updates
        else:
            assert self.optimizer is not None
            opt_tensors, extra = optimizer_tensors(self.optimizer)
            tensors.update(opt_tensors)
        return tensors, extra

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from tiermem.errors import TiermemError

        for name, param in self.named:
            saved = tensors.get(f"param:{name}")
            if saved is None or saved.shape != param.shape:
                raise TiermemError(f"checkpoint does not match the model: tensor {name} missing or of another shape")
            param.copy_(saved)
        if self.zo is not None:
            self.zo.state = {k[len("state:") :]: v for k, v in tensors.items() if k.startswith("state:")}
            self.zo.updates = int(meta.get("zo_updates", 0))
        else:
            assert self.optimizer is not None
            restore_optimizer(self.optimizer, tensors, meta)

    def save_model(self, out: Path) -> None:
        """The tuned model as a folder ``tiermem generate --model`` loads (LoRA: adapter saved, then merged)."""
        model: Any = self.model
        if self.config.uses_lora:
            model = save_lora(self.model, out)
        if self.config.gradient_checkpointing:
            self.lm.model.gradient_checkpointing_disable()
        model.save_pretrained(str(out / "model"))
        self.lm.tokenizer.save_pretrained(str(out / "model"))

    def close(self) -> None:
        self.lm.close()
