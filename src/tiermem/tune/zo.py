"""Zeroth-order optimizers: MeZO's ZO-SGD and the ZO-Bench variants (sign, momentum, Adam), all on SPSA estimates.

One step (MeZO, Malladi et al. 2023, Algorithm 1), for a step seed ``s`` and the trained tensors θ:

1. ``θ += ε·z(s)``, loss₊ = L(θ);  2. ``θ −= 2ε·z(s)``, loss₋ = L(θ);  3. ``θ += ε·z(s)`` (restore);
4. ``g = (loss₊ − loss₋) / (2ε)``, a scalar: the projected gradient; 5. regenerate z(s) and apply the rule below.

n-SPSA (MeZO, Definition 1: ``∇̂L = (1/n) Σᵢ gᵢ·zᵢ``; MeZO's default and ours is n = 1, ZO-Bench calls n the query
budget q): :meth:`ZOOptimizer.step_queries` runs steps 1-4 for n independent directions zᵢ, each with its own seed
(:func:`~tiermem.tune.perturb.query_seed`) and all on the same batch at the same θ, then applies the rule once to
ĝ = (1/n) Σᵢ gᵢ·zᵢ, regenerating every zᵢ chunk by chunk (no noise is stored; two chunks of extra memory: ĝ and one
zᵢ). n = 1 is exactly :meth:`ZOOptimizer.step`. ``zo-sgd-sign`` takes n = 1 only: its rule uses the sign of the
one scalar g.

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

from tiermem.tune.perturb import CHUNK, GAUSSIAN, Noise, perturb_, query_seed


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
    noise: Noise = GAUSSIAN  # where z comes from (:mod:`tiermem.tune.perturb`): MeZO's draw or a noise table

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
        loss_plus, loss_minus, g = self.probe(named, seed, loss)
        self.begin_update()
        for name, param in named:
            self.update_tensor(name, param, seed, g)
        return loss_plus, loss_minus, g

    @torch.no_grad()
    def probe(
        self, named: list[tuple[str, torch.Tensor]], seed: int, loss: Callable[[], float]
    ) -> tuple[float, float, float]:
        """Steps 1-4 along z(seed): (loss₊, loss₋, g), with θ restored afterwards (nothing is updated)."""
        eps = self.hyper.eps
        perturb_(named, seed, eps, self.noise)
        loss_plus = loss()
        perturb_(named, seed, -2 * eps, self.noise)
        loss_minus = loss()
        perturb_(named, seed, eps, self.noise)
        return loss_plus, loss_minus, self.projected_grad(loss_plus, loss_minus)

    @torch.no_grad()
    def step_queries(
        self, named: list[tuple[str, torch.Tensor]], seed: int, loss: Callable[[], float], queries: int
    ) -> list[tuple[float, float, float]]:
        """One n-SPSA step (n = ``queries``) in place on ``named``: (loss₊, loss₋, gᵢ) per direction.

        Every direction is probed at the same θ (each ±ε pair is undone before the next), then θ moves once along
        ĝ = (1/n) Σᵢ gᵢ·z(query_seed(seed, i)). ``queries == 1`` is :meth:`step`, bitwise.
        """
        if queries == 1:
            return [self.step(named, seed, loss)]
        if self.method == "zo-sgd-sign":
            raise ValueError("zo-sgd-sign takes one query per step")
        probes = [self.probe(named, query_seed(seed, query), loss) for query in range(queries)]
        self.begin_update()
        weights = [(query_seed(seed, q), g / queries) for q, (_, _, g) in enumerate(probes)]
        for name, param in named:
            self.update_tensor_average(name, param, weights)
        return probes

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
            if self.method == "zo-sgd":
                self._decay(piece, decay)
                self.noise.add_(piece, seed, name, c, -h.lr * g)
            elif self.method == "zo-sgd-sign":
                self.noise.add_(piece, seed, name, c, (-h.lr * math.copysign(1.0, g)) if g != 0 else 0.0)
            else:
                z = self.noise.chunk(seed, name, c, piece.numel(), param.dtype)
                self._stateful(piece, z.mul_(g), decay, [b.view(-1)[start : start + CHUNK] for b in buffers])

    @torch.no_grad()
    def update_tensor_average(self, name: str, param: torch.Tensor, weights: list[tuple[int, float]]) -> None:
        """The rule on one tensor for ĝ = Σ wᵢ·z(seedᵢ) over ``weights`` = [(seedᵢ, gᵢ/n)] (n-SPSA).

        Per chunk, ĝ is summed from the regenerated zᵢ (two extra chunks), then ``zo-sgd``, ``zo-sgd-mmt`` or
        ``zo-adam`` applies its rule to it as to a one-direction ĝ; weight decay is applied once per step.
        Shapes: ``param`` any, updated in place; each chunk of ĝ is ``(min(CHUNK, numel),)``.
        """
        h, flat = self.hyper, param.view(-1)
        decay = h.weight_decay if decays(name) else 0.0
        buffers = self._buffers(name, param)
        for c, start in enumerate(range(0, flat.numel(), CHUNK)):
            piece = flat[start : start + CHUNK]
            grad = torch.zeros_like(piece)
            for seed, weight in weights:
                self.noise.add_(grad, seed, name, c, weight)
            if self.method == "zo-sgd":
                self._decay(piece, decay)
                piece.add_(grad, alpha=-h.lr)
            elif self.method == "zo-sgd-sign":
                raise ValueError("zo-sgd-sign takes one query per step")
            else:
                self._stateful(piece, grad, decay, [b.view(-1)[start : start + CHUNK] for b in buffers])

    def _buffers(self, name: str, param: torch.Tensor) -> list[torch.Tensor]:
        keys = {"zo-sgd-mmt": ["m"], "zo-adam": ["m", "v"]}.get(self.method, [])
        return [self.state.setdefault(f"{k}:{name}", torch.zeros_like(param)) for k in keys]

    def _decay(self, piece: torch.Tensor, decay: float) -> None:
        """ZO-SGD's weight decay on one chunk, before its step: θ *= 1 - lr·wd (SGD's own)."""
        if decay:
            piece.mul_(1 - self.hyper.lr * decay)

    def _stateful(self, piece: torch.Tensor, grad: torch.Tensor, decay: float, buffers: list[torch.Tensor]) -> None:
        """ZO-SGD-MMT or ZO-Adam on one chunk of ĝ (``grad``, overwritten), with its state chunks ``buffers``."""
        h = self.hyper
        if decay:  # torch.optim.SGD/Adam's (coupled) weight_decay: grad += wd·θ
            grad.add_(piece, alpha=decay)
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
