"""Zeroth-order optimizers: MeZO's ZO-SGD and the ZO-Bench variants (sign, momentum, Adam), all on SPSA estimates.

One step (MeZO, Malladi et al. 2023, Algorithm 1), for a step seed ``s`` and the trained tensors θ:

1. ``θ += ε·z(s)``, loss₊ = L(θ);  2. ``θ −= 2ε·z(s)``, loss₋ = L(θ);  3. ``θ += ε·z(s)`` (restore);
4. ``g = (loss₊ − loss₋) / (2ε)``, a scalar: the projected gradient; 5. regenerate z(s) and apply the rule below.

The rules (ZO-Bench, Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A
Benchmark", ICML 2024, ``zo-bench/trainer.py``), with ĝ = g·z the estimated gradient of one tensor:

- ``zo-sgd`` (MeZO): ``θ −= lr·(ĝ + wd·θ)``; no state.
- ``zo-sgd-sign``: ``θ −= lr·sign(g)·z`` (ZO-signSGD: the sign of the scalar projected gradient); no state.
- ``zo-sgd-mmt``: ``torch.optim.SGD`` with momentum μ: ``b = μ·b + ĝ``, ``θ −= lr·b``; one buffer per parameter.
- ``zo-adam``: ``torch.optim.Adam`` (β₁, β₂, eps 1e-8, bias correction) on ĝ; two buffers per parameter.

Departures from the reference code, and why: ZO-Bench sets ``param.grad = ĝ`` and calls a torch optimizer one tensor
at a time, which materialises a full-size gradient per tensor. Here the same formulas run one chunk of z at a time
(:mod:`tiermem.tune.perturb`), so the extra memory is a chunk, and the streamed (ZO2) path can apply them to one
layer while it is in RAM. Adam is written out with torch's own formula (``denom = sqrt(v)/sqrt(bc₂) + eps``,
``θ −= lr/bc₁ · m/denom``). Weight decay, as in MeZO, skips biases and norms; its default is MeZO's (0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from tiermem.tune.perturb import CHUNK, chunk_noise, perturb_


@dataclass(frozen=True)
class ZOHyper:
    """Hyper-parameters of one ZO method; defaults per method live in :data:`ZO_DEFAULTS`."""

    lr: float
    eps: float
    weight_decay: float = 0.0
    momentum: float = 0.9  # zo-sgd-mmt
    betas: tuple[float, float] = (0.9, 0.999)  # zo-adam (torch.optim.Adam's)
    adam_eps: float = 1e-8


# (full-parameter, LoRA) defaults. MeZO (Table 15, OPT-13B): full FT lr 1e-6/1e-7 with eps 1e-3, LoRA lr 5e-5 or
# 1e-4 with eps 1e-2; we take the larger lr of each grid (a 135M model, few steps). ZO-Bench sweeps lr over
# {1e-5, 1e-6, 1e-7, 1e-8} and eps over {1e-2, 1e-3, 1e-4}; the sign, momentum and Adam values below are picks from
# that grid (Adam and sign steps do not scale with |g|, momentum accumulates ~1/(1-μ) = 10 steps), not values read
# from ZO-Bench's tables.
ZO_DEFAULTS: dict[str, tuple[ZOHyper, ZOHyper]] = {
    "zo-sgd": (ZOHyper(lr=1e-6, eps=1e-3), ZOHyper(lr=5e-5, eps=1e-2)),
    "zo-sgd-sign": (ZOHyper(lr=1e-6, eps=1e-3), ZOHyper(lr=5e-5, eps=1e-2)),
    "zo-sgd-mmt": (ZOHyper(lr=1e-7, eps=1e-3), ZOHyper(lr=5e-6, eps=1e-2)),
    "zo-adam": (ZOHyper(lr=1e-5, eps=1e-3), ZOHyper(lr=1e-4, eps=1e-2)),
}
ZO_METHODS = tuple(ZO_DEFAULTS)


def decays(name: str) -> bool:
    """MeZO applies weight decay to every tensor except biases and layer norms."""
    lowered = name.lower()
    return "bias" not in lowered and "norm" not in lowered


@dataclass
class ZOOptimizer:
    """A ZO method over named tensors; :meth:`step` is one MeZO step, :meth:`update_tensor` the rule on one tensor.

    ``state`` holds the momentum (``m:<name>``) and Adam (``m:``, ``v:``) buffers, which :mod:`checkpoint` saves.
    """

    method: str
    hyper: ZOHyper
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    updates: int = 0  # steps applied, for Adam's bias correction

    def __post_init__(self) -> None:
        if self.method not in ZO_DEFAULTS:
            raise ValueError(f"unknown ZO method {self.method}")

    def projected_grad(self, loss_plus: float, loss_minus: float) -> float:
        """g = (loss₊ − loss₋) / (2ε): the directional derivative along z (SPSA, two-sided)."""
        return (loss_plus - loss_minus) / (2 * self.hyper.eps)

    @torch.no_grad()
    def step(
        self, named: list[tuple[str, torch.Tensor]], seed: int, loss: Callable[[], float]
    ) -> tuple[float, float, float]:
        """One MeZO step in place on ``named``: returns (loss₊, loss₋, g). ``loss`` runs one forward pass."""
        eps = self.hyper.eps
        perturb_(named, seed, eps)
        loss_plus = loss()
        perturb_(named, seed, -2 * eps)
        loss_minus = loss()
        perturb_(named, seed, eps)
        g = self.projected_grad(loss_plus, loss_minus)
        self.begin_update()
        for name, param in named:
            self.update_tensor(name, param, seed, g)
        return loss_plus, loss_minus, g

    def begin_update(self) -> None:
        """Call once per step before :meth:`update_tensor` (advances Adam's step count)."""
        self.updates += 1

    @torch.no_grad()
    def update_tensor(self, name: str, param: torch.Tensor, seed: int, g: float) -> None:
        """Apply this method's rule to one tensor with the regenerated z(seed); param is updated in place."""
        h, flat = self.hyper, param.view(-1)
        decay = h.weight_decay if decays(name) else 0.0
        buffers = self._buffers(name, param)
        for c, start in enumerate(range(0, flat.numel(), CHUNK)):
            piece = flat[start : start + CHUNK]
            z = chunk_noise(seed, name, c, piece.numel(), param.dtype)
            if self.method == "zo-sgd":
                if decay:
                    piece.mul_(1 - h.lr * decay)
                piece.add_(z, alpha=-h.lr * g)
            elif self.method == "zo-sgd-sign":
                piece.add_(z, alpha=(-h.lr * math.copysign(1.0, g)) if g != 0 else 0.0)
            else:
                grad = z.mul_(g)
                if decay:  # torch.optim.SGD/Adam's (coupled) weight_decay: grad += wd·θ
                    grad.add_(piece, alpha=decay)
                self._stateful(piece, grad, [b.view(-1)[start : start + CHUNK] for b in buffers])

    def _buffers(self, name: str, param: torch.Tensor) -> list[torch.Tensor]:
        keys = {"zo-sgd-mmt": ["m"], "zo-adam": ["m", "v"]}.get(self.method, [])
        return [self.state.setdefault(f"{k}:{name}", torch.zeros_like(param)) for k in keys]

    def _stateful(self, piece: torch.Tensor, grad: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        h = self.hyper
        if self.method == "zo-sgd-mmt":
            (buf,) = buffers
            # torch.optim.SGD: the first step copies the gradient into the buffer (no dampening).
            if self.updates == 1:
                buf.copy_(grad)
            else:
                buf.mul_(h.momentum).add_(grad)
            piece.add_(buf, alpha=-h.lr)
            return
        m, v = buffers
        beta1, beta2 = h.betas
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**self.updates
        bias2 = 1 - beta2**self.updates
        denom = (v.sqrt() / math.sqrt(bias2)).add_(h.adam_eps)
        piece.addcdiv_(m, denom, value=-h.lr / bias1)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def trained(named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors a ZO method perturbs: those with ``requires_grad`` (all of them, or only LoRA's A and B)."""
    return [(name, p.data) for name, p in named if p.requires_grad]
